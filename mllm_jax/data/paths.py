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
"""
from __future__ import annotations

import os

OUTSIDE_ROOT = "outside_root"


class OutsideRoot(ValueError):
    """An image path that resolves outside its root; the message names both."""

    reason = OUTSIDE_ROOT


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_image_path(root, path, *, allow_absolute: bool = False) -> str:
    """`path` joined to `root` (unchanged when absolute), after checking it stays inside
    `root` as the module docstring says; `OutsideRoot` otherwise."""
    root, path = os.fspath(root), os.fspath(path)
    full = os.path.join(root, path)
    hint = ("move the image under the root, or point the image root at the folder holding "
            "the images")
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
