"""Config files (`get_config()` in a Python file) with dotted command-line overrides, as
ml_collections' config flags do it: `--config.train.lr=1e-4`."""
import ast
import difflib
import importlib.util
import os

import ml_collections


def load(path: str) -> ml_collections.ConfigDict:
    """The config of a recipe file's `get_config()`, locked (see `train.recipe.lock`): an
    override or a later assignment to a field that does not exist is an error."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(
        "mllm_jax_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"{path} defines no get_config()")
        cfg = module.get_config()
    except (AttributeError, KeyError) as e:  # a recipe naming a field that does not exist
        raise KeyError(f"{path}: {e}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ValueError(f"{path}: get_config() returned {type(cfg).__name__}, not a "
                         "ConfigDict")
    from mllm_jax.train.recipe import lock
    return lock(cfg) if "model" in cfg else cfg


def dotted_keys(cfg, prefix="") -> list[str]:
    """Every field of a config, as dotted paths ('train.lr', 'model.text.hidden_size')."""
    out = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        value = cfg[key]
        out.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            out.extend(dotted_keys(value, path + "."))
    return out


def unknown_field_message(cfg, key: str, where: str) -> str:
    """'no field X in the config; did you mean Y?' with the nearest existing fields."""
    keys = dotted_keys(cfg)
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not near:  # a right leaf in the wrong section: compare the last component
        leaf = key.rsplit(".", 1)[-1]
        near = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:3]
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    fields = ""
    if parent and parent in keys and isinstance(_get(cfg, parent), ml_collections.ConfigDict):
        fields = f" Fields of {parent}: {', '.join(sorted(_get(cfg, parent).keys()))}."
    return f"{where}: no field {key!r} in the config{hint}{fields}"


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


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
    """overrides: ["train.lr=1e-4", "mesh.fsdp=-1", ...] (a leading "config." is dropped).
    A field that does not exist is a KeyError naming it and the nearest existing fields."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like config.a.b=value")
        key = key.removeprefix("--").removeprefix("config.")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                raise KeyError(unknown_field_message(cfg, key, f"override {item!r}"))
            node = node[p]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise KeyError(unknown_field_message(cfg, key, f"override {item!r}"))
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
