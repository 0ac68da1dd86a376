"""Training: the trainer (`train`, what `mllm-jax train` runs, and `build_trainer` /
`Trainer` to inspect, compile or time a step without the loop), objectives
(`Objective`, `register_objective`), the config layout of the LLaVA stages (`recipe`) and
config files with dotted overrides (`load_config`, `apply_overrides`).

The names are imported on first use (module `__getattr__`): `train.loop` imports
`data.sources`, which imports `train.objectives`, and the data modules import
`train.losses`, so importing the trainer here eagerly would be a cycle and would load it
with every data module.
"""
import importlib
from typing import TYPE_CHECKING

# Public name -> (the module that defines it, its name there; None for the module itself).
_EXPORTS = {
    "train": ("mllm_jax.train.loop", "train"),
    "build_trainer": ("mllm_jax.train.loop", "build_trainer"),
    "Trainer": ("mllm_jax.train.loop", "Trainer"),
    "TrainingStopped": ("mllm_jax.train.loop", "TrainingStopped"),
    "Objective": ("mllm_jax.train.objectives", "Objective"),
    "register_objective": ("mllm_jax.train.objectives", "register_objective"),
    "recipe": ("mllm_jax.train.recipe", None),
    "load_config": ("mllm_jax.train.config_file", "load"),
    "apply_overrides": ("mllm_jax.train.config_file", "apply_overrides"),
}

__all__ = ["train", "build_trainer", "Trainer", "TrainingStopped", "Objective",
           "register_objective", "recipe", "load_config", "apply_overrides"]

if TYPE_CHECKING:
    from mllm_jax.train import recipe
    from mllm_jax.train.config_file import apply_overrides
    from mllm_jax.train.config_file import load as load_config
    from mllm_jax.train.loop import Trainer, TrainingStopped, build_trainer, train
    from mllm_jax.train.objectives import Objective, register_objective


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attr = _EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
