"""Several checkpoint directories read as one: a checkpoint whose layout keeps some tensors
in another directory (the LLaVA repository's vision tower) is matched and read like a
single one, by the names the layout gives them.
"""


class JoinedReader:
    """The tensors of several readers (`CheckpointReader`s) as one reader, each part under
    its own renaming. parts: [(reader, rename)], rename(key) -> the name it is read by, or
    None to leave the tensor out. A name two parts give is refused, naming both files."""

    def __init__(self, directory, parts):
        self.directory = directory
        self._where = {}
        for reader, rename in parts:
            for key in reader.keys():
                name = rename(key)
                if name is None:
                    continue
                if name in self._where:
                    other, other_key = self._where[name]
                    raise ValueError(
                        f"{name!r} is held twice: as {other_key!r} in {_file(other, other_key)} "
                        f"and as {key!r} in {_file(reader, key)}; remove one of them")
                self._where[name] = (reader, key)

    def keys(self):
        return list(self._where)

    def shape(self, name):
        reader, key = self._where[name]
        return reader.shape(key)

    def dtype(self, name):
        reader, key = self._where[name]
        return reader.dtype(key)

    def get(self, name):
        reader, key = self._where[name]
        return reader.get(key)

    def file_of(self, name):
        reader, key = self._where[name]
        return _file(reader, key)


def _file(reader, key) -> str:
    """The file holding `key`, with its directory (the parts' directories differ)."""
    return f"{reader.directory}/{reader.file_of(key)}"
