"""Paths of a training run that may be local or remote (`gs://bucket/...`, or any other URI
`etils.epath` reads): data files and images, the workdir, checkpoints and exports.

Local paths keep the os-level calls they always had (an atomic rename of a complete file,
O_EXCL / hard-link locks, fsync, symlink checks); remote paths go through `etils.epath.Path`.
What a remote store gives is weaker in places, and the callers say where: an object write is
atomic (readers see the old object or the new one, never a part), but there is no atomic
rename of a directory, no exclusive create and no hard link.

Path strings stay strings (messages name them as the user wrote them, and orbax and TFDS are
handed them unchanged); `as_path` gives the `epath.Path` to open.
"""
from __future__ import annotations

import os
import posixpath
import re
import shutil

from etils import epath

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path) -> bool:
    """Whether `path` (a str or os.PathLike) is a URI such as gs://bucket/dir."""
    return isinstance(path, (str, os.PathLike)) and bool(_URI.match(os.fspath(path)))


def as_path(path) -> epath.Path:
    """The `etils.epath.Path` of a local path or a URI."""
    return epath.Path(path)


def _split(path: str) -> tuple[str, str]:
    """(scheme://, rest) of a URI."""
    m = _URI.match(path)
    return path[:m.end()], path[m.end():]


def absolute(path) -> str:
    """A local path made absolute (os.path.abspath); a URI as it is (without a trailing /)."""
    path = os.fspath(path)
    if is_remote(path):
        scheme, rest = _split(path)
        return scheme + rest.rstrip("/")
    return os.path.abspath(path)


def normpath(path) -> str:
    """os.path.normpath of a local path; a URI's path part normalised the same way (`a/../b`
    -> `b`), its scheme kept."""
    path = os.fspath(path)
    if is_remote(path):
        scheme, rest = _split(path)
        return scheme + posixpath.normpath(rest).lstrip("/")
    return os.path.normpath(path)


def join(path, *parts) -> str:
    path = os.fspath(path)
    return (posixpath if is_remote(path) else os.path).join(path, *map(os.fspath, parts))


def dirname(path) -> str:
    path = os.fspath(path)
    if is_remote(path):
        scheme, rest = _split(path)
        return scheme + posixpath.dirname(rest.rstrip("/"))
    return os.path.dirname(path)


def exists(path) -> bool:
    return as_path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    return as_path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
    if is_remote(path):
        p = as_path(path)
        return p.exists() and not p.is_dir()
    return os.path.isfile(path)


def listdir(path) -> list[str]:
    if is_remote(path):
        return sorted(p.name for p in as_path(path).iterdir())
    return os.listdir(path)


def makedirs(path) -> None:
    """Creates the directory and its parents (a remote store has no directories to create
    beyond the objects in them: this is cheap there)."""
    if is_remote(path):
        as_path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path) -> None:
    if is_remote(path):
        as_path(path).unlink()
    else:
        os.remove(path)


def rmtree(path, ignore_errors: bool = False) -> None:
    if is_remote(path):
        try:
            as_path(path).rmtree()
        except OSError:
            if not ignore_errors:
                raise
    else:
        shutil.rmtree(path, ignore_errors=ignore_errors)


def move(src, dst) -> None:
    """Moves a file or directory: shutil.move locally; remotely a copy of every object
    followed by deleting the source (not atomic: a failure midway can leave both)."""
    if is_remote(src) or is_remote(dst):
        as_path(src).rename(dst)
    else:
        shutil.move(src, dst)


def open_file(path, mode: str = "r", encoding: str | None = None):
    """`open` for a local path (unchanged behaviour); `epath.Path.open` for a URI (UTF-8 text,
    modes r, w, a with optional b)."""
    if is_remote(path):
        return as_path(path).open(mode, encoding=encoding)
    return open(path, mode, encoding=encoding)


def read_text(path) -> str:
    with open_file(path, "r", encoding="utf-8") as f:
        return f.read()


def write_atomic(path, data, *, fsync: bool = False) -> None:
    """Writes `data` (str or bytes) so that a reader of `path` sees the old file or the new
    one, never a part: locally a temporary file beside it renamed into place (os.replace),
    remotely one object write (the object is replaced when the upload completes)."""
    binary = isinstance(data, (bytes, bytearray, memoryview))
    if is_remote(path):
        with as_path(path).open("wb" if binary else "w") as f:
            f.write(data)
        return
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
