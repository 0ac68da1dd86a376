"""The public surface: each subpackage's `__all__` names exist, and no module reaches into
another module's private (`_name`) helpers."""
import ast
import importlib
import pathlib

import pytest

import mllm_jax

PACKAGE_DIR = pathlib.Path(mllm_jax.__file__).parent
SUBPACKAGES = sorted(
    "mllm_jax." + ".".join(p.parent.relative_to(PACKAGE_DIR).parts)
    for p in PACKAGE_DIR.rglob("__init__.py") if p.parent != PACKAGE_DIR)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: pathlib.Path, package_dir: pathlib.Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module an ImportFrom names, with relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private_uses(path: pathlib.Path, package_dir: pathlib.Path = PACKAGE_DIR) -> list[str]:
    """`from mllm_jax.x import _y`, and `m._y` where `m` is bound to an mllm_jax module by an
    import in the same file."""
    module = _module_name(path, package_dir)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bound = {}  # local name -> the mllm_jax module (or name) it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, path.name == "__init__.py")
            if source.split(".")[0] != "mllm_jax":
                continue
            for alias in node.names:
                if _is_private(alias.name) and source != module:
                    found.append(f"{path}:{node.lineno}: from {source} import {alias.name}")
                bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mllm_jax":
                    bound[alias.asname or "mllm_jax"] = alias.name if alias.asname else "mllm_jax"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            base, chain = node.value, []
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                target = ".".join([bound[base.id], *reversed(chain)])
                found.append(f"{path}:{node.lineno}: {target}.{node.attr}")
    return found


def test_subpackages_found():
    assert {"mllm_jax.data", "mllm_jax.eval", "mllm_jax.infer", "mllm_jax.train"} <= set(
        SUBPACKAGES)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_all_names_exist(name):
    package = importlib.import_module(name)
    exported = getattr(package, "__all__", None)
    if exported is None:
        pytest.skip(f"{name} has no __all__")
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
    missing = [n for n in exported if not hasattr(package, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
    assert all(n in dir(package) for n in exported)


@pytest.mark.parametrize("name", ["mllm_jax.data", "mllm_jax.eval", "mllm_jax.infer",
                                  "mllm_jax.train"])
def test_curated_subpackages_have_all(name):
    package = importlib.import_module(name)
    assert package.__doc__ and package.__all__


def test_lazy_exports_are_the_defining_modules_objects():
    from mllm_jax import data, train
    from mllm_jax.data import sources
    from mllm_jax.train import config_file, loop, recipe
    assert data.make_data is sources.make_data
    assert train.train is loop.train
    assert train.load_config is config_file.load
    assert train.recipe is recipe
    for package in (data, train):  # the lazy table and __all__ name the same things
        assert sorted(package._EXPORTS) == sorted(package.__all__)
    with pytest.raises(AttributeError):
        data.no_such_name  # noqa: B018


def test_infer_generate_is_still_the_module():
    # `mllm_jax.infer.generate.generate` (the decoding loop) is reached through the module.
    import mllm_jax.infer
    import mllm_jax.infer.generate as gen
    assert mllm_jax.infer.generate is gen
    assert callable(gen.generate)


def test_scanner_finds_private_imports(tmp_path):
    root = tmp_path / "mllm_jax" / "sub"
    root.mkdir(parents=True)
    bad = root / "bad.py"
    bad.write_text("from mllm_jax.sub.other import _helper, public, __version__\n"
                   "from mllm_jax.sub import other as o\n"
                   "import mllm_jax.sub.other\n"
                   "o._private()\n"
                   "mllm_jax.sub.other._private()\n"
                   "o.__name__\n")
    found = _private_uses(bad, tmp_path / "mllm_jax")
    assert len(found) == 3, found
    assert "import _helper" in found[0]
    assert all("__version__" not in f and "__name__" not in f for f in found)


def test_no_module_imports_another_modules_private_names():
    found = [use for path in sorted(PACKAGE_DIR.rglob("*.py")) for use in _private_uses(path)]
    assert not found, ("modules reach into other modules' private names (make the helper "
                       "public in its module, or keep it to that module):\n  "
                       + "\n  ".join(found))
