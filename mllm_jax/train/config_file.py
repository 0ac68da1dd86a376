"""Config files (`get_config()` in a Python file) with dotted command-line overrides, as
ml_collections' config flags do it: `--config.train.lr=1e-4`."""
import ast
import difflib
import importlib.util
import os

import ml_collections


def load(path: str, overrides=()) -> ml_collections.ConfigDict:
    """The config of a recipe file's `get_config()`, locked (see `train.recipe.lock`), with
    `overrides` applied (see `apply_overrides`) and its values checked (`train.validate`):
    an unknown field, an override that does not parse as its field's type, or a value out
    of range is a `validate.ConfigError` (a ValueError) listing every problem at once."""
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
    cfg = lock(cfg) if "model" in cfg else cfg
    return apply_overrides(cfg, overrides, source=path)


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


def _kind(current) -> str:
    if isinstance(current, bool):
        return "True or False"
    if isinstance(current, int):
        return "an integer"
    if isinstance(current, float):
        return "a number"
    if isinstance(current, (list, tuple)):
        return "a list, e.g. ['a', 'b']"
    if isinstance(current, (dict, ml_collections.ConfigDict)):
        return "a dict, e.g. {'beta': 0.1}"
    return type(current).__name__


def _parse(text: str, current):
    """The override's value as the type of the field's current value; a ValueError saying
    what was expected when it is not one."""
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if current is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(current, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    elif isinstance(current, (dict, ml_collections.ConfigDict)):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ValueError(f"takes {_kind(current)} (now {current!r}), not {text!r}")
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides, source: str = ""
                    ) -> ml_collections.ConfigDict:
    """overrides: ["train.lr=1e-4", "mesh.fsdp=-1", ...] (a leading "config." is dropped).
    Each value is read as its field's type (a Python literal; strings as written). Then the
    config's values are checked (`train.validate`). Every problem (an unknown field, named
    with the nearest existing fields; a value that is not its field's type; a value out of
    range) is collected and raised at once as a `validate.ConfigError`, a ValueError (an
    `UnknownFieldError`, also a KeyError, when a field does not exist)."""
    from mllm_jax.train import validate
    found, unknown = [], False
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            found.append(f"override {item!r} must look like config.a.b=value")
            continue
        key = key.removeprefix("--").removeprefix("config.")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                node = None
                break
            node = node[p]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            found.append(unknown_field_message(cfg, key, f"override {item!r}"))
            unknown = True
            continue
        try:
            node[leaf] = _parse(text, node[leaf])
        except (TypeError, ValueError) as e:
            found.append(f"override {item!r}: {key} {e}")
    found += validate.problems(cfg)
    if found:
        raise (validate.UnknownFieldError if unknown else validate.ConfigError)(found, source)
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
