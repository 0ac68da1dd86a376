"""Writing a checkpoint directory without ever mixing it with an earlier one: the files are
written into a temporary sibling directory and moved into place only once complete, so a
failure midway leaves the destination as it was.

A remote destination (gs://...) is staged the same way, in a sibling directory written
through etils.epath (and by orbax directly), but an object store has no atomic rename: the
finished files are then moved (copied object by object, then deleted) into place, so a
failure during that last move can leave the destination partly written."""
import contextlib
import os
import shutil
import uuid

from mllm_jax import storage


def require_empty(path, how: str = "pass --overwrite") -> None:
    """Raises FileExistsError naming `path` unless it is absent or an empty directory."""
    path = os.fspath(path)
    if storage.is_remote(path):
        if storage.exists(path) and not storage.isdir(path):
            raise FileExistsError(f"{path} exists and is not a directory; choose another "
                                  "destination")
        if storage.isdir(path) and storage.listdir(path):
            raise FileExistsError(
                f"{path} exists and is not empty; {how} to replace it whole (what it holds "
                "now is deleted once the new checkpoint is complete), or choose another "
                "destination")
        return
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory; choose another "
                              "destination")
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(
            f"{path} exists and is not empty; {how} to replace it whole (what it holds now is "
            "deleted once the new checkpoint is complete), or choose another destination")


def require_outside(source, path) -> None:
    """Raises ValueError when replacing `path` would delete `source` (it is or holds it)."""
    if storage.is_remote(source) or storage.is_remote(path):  # no symlinks to follow there
        src, dst = storage.normpath(source), storage.normpath(path)
        inside = src == dst or src.startswith(dst.rstrip("/") + "/")
    else:
        src, dst = os.path.realpath(source), os.path.realpath(path)
        inside = os.path.commonpath([src, dst]) == dst
    if inside:
        raise ValueError(f"{path} holds the source {source}; replacing it would delete the "
                         "source: write the checkpoint somewhere else")


def _sibling(path: str, tag: str) -> str:
    if storage.is_remote(path):
        parent, base = storage.dirname(path), path.rstrip("/").rsplit("/", 1)[-1]
        return storage.join(parent, f".{base}.{tag}-{uuid.uuid4().hex[:8]}")
    parent, base = os.path.split(path)
    return os.path.join(parent, f".{base}.{tag}-{uuid.uuid4().hex[:8]}")


def _remove(path: str) -> None:
    if storage.is_remote(path):
        storage.rmtree(path)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


@contextlib.contextmanager
def staged(path, *, replace: bool):
    """Yields a new empty directory beside `path` to write into. When the block succeeds,
    with `replace` (or when `path` does not exist) the directory becomes `path`, whose old
    contents are deleted after the swap; otherwise its files are moved into the existing
    `path`, which must not already hold files of the same names. When the block fails, the
    directory is removed and `path` is untouched."""
    if storage.is_remote(path):
        with _staged_remote(storage.absolute(path), replace=replace) as work:
            yield work
        return
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    work = _sibling(path, "partial")
    os.mkdir(work)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if not replace and os.path.isdir(path):
        clash = sorted(set(os.listdir(work)) & set(os.listdir(path)))
        if clash:
            shutil.rmtree(work, ignore_errors=True)
            raise FileExistsError(f"{path} already holds {', '.join(clash)}")
        for name in os.listdir(work):
            os.rename(os.path.join(work, name), os.path.join(path, name))
        os.rmdir(work)
        return
    old = None
    if os.path.lexists(path):
        old = _sibling(path, "old")
        os.rename(path, old)
    try:
        os.rename(work, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        shutil.rmtree(work, ignore_errors=True)
        raise
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def _staged_remote(path: str, *, replace: bool):
    """`staged` for a URI (see the module doc): the same steps, with moves that copy."""
    work = _sibling(path, "partial")
    storage.makedirs(work)
    try:
        yield work
    except BaseException:
        storage.rmtree(work, ignore_errors=True)
        raise
    names = storage.listdir(work) if storage.isdir(work) else []
    if storage.isdir(path) and storage.listdir(path):
        if not replace:
            clash = sorted(set(names) & set(storage.listdir(path)))
            if clash:
                storage.rmtree(work, ignore_errors=True)
                raise FileExistsError(f"{path} already holds {', '.join(clash)}")
        else:
            storage.rmtree(path)
    storage.makedirs(path)
    for name in names:
        storage.move(storage.join(work, name), storage.join(path, name))
    storage.rmtree(work, ignore_errors=True)
