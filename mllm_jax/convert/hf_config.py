"""HF `config.json` <-> our model configs, through the model registry: each family owns its
mapping (`ModelFamily.from_hf` / `to_hf`, beside its module), and so does each other
program's checkpoint layout (`registry.CheckpointLayout`); this file finds the one that
applies, and `checkpoint_layout` gives the layout a config is read from or written as.
"""

from mllm_jax import jsonfile, storage
from mllm_jax.convert import hf_keys
from mllm_jax.models import registry
from mllm_jax.models.registry import CheckpointLayout, UnsupportedModelError

__all__ = ["read_config_json", "from_hf", "to_hf", "checkpoint_layout",
           "UnsupportedModelError"]


def read_config_json(directory) -> dict:
    path = storage.join(directory, "config.json")
    if not storage.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{directory} has no config.json; point load_hf at an HF checkpoint directory "
            "(config.json + *.safetensors)")
    return jsonfile.read_object(path, "restore the checkpoint's config.json")


def from_hf(hf: dict, where: str = "config.json", *, directory=None, **options):
    """Our model config for an HF config dict, checked by its family (field types, counts
    within bounds, heads dividing widths, ...) before anything is built from it; a bad value
    raises `registry.InvalidConfigError` naming `where`, the field and the value.

    directory: the checkpoint directory the dict comes from (a layout may read more there);
    options: load_hf's layout options (`vision_tower=`), for layouts that take them."""
    found = registry.layout_for_hf(hf)
    if found is not None:
        cfg = found[1].from_hf(hf, where, directory=directory, **options)
    else:
        model_type = hf.get("model_type")
        try:
            _, family = registry.family_for_hf(model_type)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{where}: {e}") from None
        if options:
            raise UnsupportedModelError(
                f"{where}: {', '.join(f'{k}=' for k in sorted(options))} applies to "
                f"checkpoints in another program's layout ({', '.join(registry.LAYOUTS.names())}); "
                f"this one is an HF {model_type!r} checkpoint, which holds all it needs")
        cfg = family.from_hf(hf, where)
    registry.check_config(cfg, where)
    return cfg


def to_hf(cfg, layout=None) -> dict:
    """The config.json dict for our model config, in `layout` (see `checkpoint_layout`)."""
    return checkpoint_layout(cfg, layout)[1].to_hf(cfg)


def checkpoint_layout(cfg, name=None) -> tuple[str, CheckpointLayout]:
    """(name, layout) for writing or reading `cfg`'s checkpoint: `name` (`registry.HF_LAYOUT`
    or a registered layout), else the layout `cfg` records it was read from, else the
    family's HF layout."""
    name = name or registry.recorded_layout(cfg)
    if name != registry.HF_LAYOUT:
        if name not in registry.LAYOUTS:
            raise UnsupportedModelError(
                f"unknown checkpoint layout {name!r}; known: "
                f"{', '.join([registry.HF_LAYOUT] + registry.LAYOUTS.names())}")
        layout = registry.LAYOUTS.get(name)
        if layout.family != cfg.model_type:
            raise UnsupportedModelError(
                f"layout {name!r} holds {layout.family} models, not {cfg.model_type}; "
                f"write this model with layout={registry.HF_LAYOUT!r}")
        return name, layout
    family = registry.family(cfg)

    def family_to_hf(c):
        if family.to_hf is None:
            raise UnsupportedModelError(f"model_type {c.model_type!r} cannot be written as HF")
        return family.to_hf(c)

    return name, CheckpointLayout(
        family=cfg.model_type, hf_model_types=family.hf_model_types,
        from_hf=lambda hf, where="config.json", directory=None: family.from_hf(hf, where),
        to_hf=family_to_hf,
        canonical_key=lambda c, key: hf_keys.canonical_key(key, c.model_type))
