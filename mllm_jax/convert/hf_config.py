"""HF `config.json` <-> our model configs, through the model registry: each family owns its
mapping (`ModelFamily.from_hf` / `to_hf`, beside its module), this file finds the family.
"""

from mllm_jax import jsonfile, storage
from mllm_jax.models import registry
from mllm_jax.models.registry import UnsupportedModelError

__all__ = ["read_config_json", "from_hf", "to_hf", "UnsupportedModelError"]


def read_config_json(directory) -> dict:
    path = storage.join(directory, "config.json")
    if not storage.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{directory} has no config.json; point load_hf at an HF checkpoint directory "
            "(config.json + *.safetensors)")
    return jsonfile.read_object(path, "restore the checkpoint's config.json")


def from_hf(hf: dict, where: str = "config.json"):
    """Our model config for an HF config dict, checked by its family (field types, counts
    within bounds, heads dividing widths, ...) before anything is built from it; a bad value
    raises `registry.InvalidConfigError` naming `where`, the field and the value."""
    model_type = hf.get("model_type")
    try:
        _, family = registry.family_for_hf(model_type)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{where}: {e}") from None
    cfg = family.from_hf(hf, where)
    registry.check_config(cfg, where)
    return cfg


def to_hf(cfg) -> dict:
    """The config.json dict for our model config."""
    family = registry.family(cfg)
    if family.to_hf is None:
        raise UnsupportedModelError(f"model_type {cfg.model_type!r} cannot be written as HF")
    return family.to_hf(cfg)
