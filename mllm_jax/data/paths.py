"""Image paths of data files, confined to the image root the user named.

A data file (LLaVA JSON, a benchmark's annotations) is input like any other: its `image`
fields are resolved against the image root, and a path that leads outside the root, by `..`,
by being absolute, or through a symlink, is refused with reason `outside_root`:

- default: the path (joined to the root when relative) must resolve, symlinks followed
  (`os.path.realpath`), inside the resolved root. An absolute path is accepted only when it
  lies inside the root.
- `allow_absolute=True` (`data.allow_absolute_image_paths`, `eval --allow-absolute-image-
  paths`): absolute paths are read wherever they are, and symlinks under the root may point
  anywhere; a relative path must still stay inside the root as written (`a/../../b` is
  refused either way: a relative path that climbs out of its root is never what a dataset
  means).

When no root is given, the data file's directory is the root.

A remote root (`gs://bucket/images`) or image path is checked on its normalised path alone:
an object store has no symlinks, so `realpath` has nothing to follow there.
"""
from __future__ import annotations

import os

from mllm_jax import storage

OUTSIDE_ROOT = "outside_root"


class OutsideRoot(ValueError):
    """An image path that resolves outside its root; the message names both."""

    reason = OUTSIDE_ROOT


def _inside(path: str, root: str, sep: str = os.sep) -> bool:
    return path == root or path.startswith(root.rstrip(sep) + sep)


def resolve_image_path(root, path, *, allow_absolute: bool = False) -> str:
    """`path` joined to `root` (unchanged when absolute), after checking it stays inside
    `root` as the module docstring says; `OutsideRoot` otherwise."""
    root, path = os.fspath(root), os.fspath(path)
    hint = ("move the image under the root, or point the image root at the folder holding "
            "the images")
    if storage.is_remote(root) or storage.is_remote(path):
        return _resolve_remote(root, path, allow_absolute, hint)
    full = os.path.join(root, path)
    if os.path.isabs(path):
        if allow_absolute:
            return full
        if not _inside(os.path.realpath(full), os.path.realpath(root)):
            raise OutsideRoot(f"image {path!r} is an absolute path outside the image root "
                              f"{root!r}; {hint}, or allow absolute image paths "
                              f"(data.allow_absolute_image_paths=true, "
                              f"eval --allow-absolute-image-paths)")
        return full
    if allow_absolute:
        escapes = not _inside(os.path.normpath(full), os.path.normpath(root))
    else:
        escapes = not _inside(os.path.realpath(full), os.path.realpath(root))
    if escapes:
        how = "climbs out of" if not _inside(os.path.normpath(full), os.path.normpath(root)) \
            else "leads (through a symlink) outside"
        raise OutsideRoot(f"image {path!r} {how} the image root {root!r}; {hint}")
    return full


def _resolve_remote(root: str, path: str, allow_absolute: bool, hint: str) -> str:
    """`resolve_image_path` when the root or the image path is a URI: an absolute image path
    (a local one, or a URI) is accepted inside the root, or anywhere with `allow_absolute`;
    a relative one must stay inside the root as written."""
    absolute = os.path.isabs(path) or storage.is_remote(path)
    # Normalised: an object store takes `a/../b` literally, where a file system resolves it.
    full = path if absolute else storage.normpath(storage.join(root, path))
    if absolute and allow_absolute:
        return full
    if not _inside(storage.normpath(full), storage.normpath(root), "/"):
        if absolute:
            raise OutsideRoot(f"image {path!r} is an absolute path outside the image root "
                              f"{root!r}; {hint}, or allow absolute image paths "
                              f"(data.allow_absolute_image_paths=true, "
                              f"eval --allow-absolute-image-paths)")
        raise OutsideRoot(f"image {path!r} climbs out of the image root {root!r}; {hint}")
    return full
