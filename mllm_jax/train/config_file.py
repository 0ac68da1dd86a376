"""Config files (`get_config()` in a Python file) with dotted command-line overrides, as
ml_collections' config flags do it: `--config.train.lr=1e-4`."""
import ast
import importlib.util
import os

import ml_collections


def load(path: str) -> ml_collections.ConfigDict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(
        "mllm_jax_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    return module.get_config()


def _parse(text: str, current):
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """overrides: ["train.lr=1e-4", "mesh.fsdp=-1", ...] (a leading "config." is dropped)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like config.a.b=value")
        key = key.removeprefix("--").removeprefix("config.")
        *parents, leaf = key.split(".")
        node = cfg
        for i, p in enumerate(parents):
            if p not in node:
                raise KeyError(f"override {item!r}: no field {'.'.join(parents[:i + 1])!r} in "
                               "the config")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"override {item!r}: no field {key!r} in the config; fields here: "
                           f"{sorted(node.keys())}")
        node[leaf] = _parse(text, node[leaf])
    return cfg


def split_config_args(argv):
    """Separates `--config.x.y=v` (or `--config.x.y v`) overrides from other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            if "=" in a:
                overrides.append(a[2:])
            elif i + 1 < len(argv):
                overrides.append(a[2:] + "=" + argv[i + 1])
                i += 1
            else:
                raise ValueError(f"override {a} has no value")
        else:
            rest.append(a)
        i += 1
    return rest, overrides
