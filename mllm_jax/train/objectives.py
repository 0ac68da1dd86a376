"""Training objectives as small objects: what batches they read, what frozen extras they set
up (DPO's reference copy), and their loss. `stage.objective` names one;
`stage.objective_kwargs` are its keywords.

    class MyLoss(Objective):
        data_mode = "lm"
        def loss(self, model, params, batch, frozen_extra): ...  # (sum, count, metrics)
    register_objective("my_loss", MyLoss)

A loss returns a sum and a count rather than a mean, so micro-batches and data-parallel
shards add up to the mean over the global batch.
"""
from typing import Any

from mllm_jax.train import partition, step as step_lib

_OBJECTIVES: dict[str, type] = {}


class Objective:
    """Base class. `data_mode` is the pipeline mode it reads: "lm" (input_ids, labels,
    pixel_values) or "dpo" (chosen/rejected pairs sharing their images)."""

    data_mode = "lm"
    # Whether `loss` takes `rng=`: a key derived from the train state's RNG and step (and
    # the micro-batch), the same on every resume (sampling, dropout).
    uses_rng = False

    def __init__(self, chunk_size: int = 2048, **kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no option(s) {sorted(kwargs)} "
                            "(stage.objective_kwargs)")
        self.chunk_size = int(chunk_size)

    def check(self, trainable_paths: list[str]) -> None:
        """Raises when the trainable parameters do not suit the objective."""

    def setup(self, params, frozen_dtype) -> dict:
        """Frozen trees the loss needs besides the model's (no gradient, no optimizer
        state), built once from the initial parameters."""
        del params, frozen_dtype
        return {}

    def project(self, params):
        """The trainable parameters after an update, mapped back where the objective keeps
        them (e.g. a temperature clamped to its range); by default unchanged."""
        return params

    def loss(self, model, params, batch, frozen_extra) -> tuple[Any, Any, dict]:
        """(sum of the per-token or per-pair losses, their count, metric sums)."""
        raise NotImplementedError


class LanguageModeling(Objective):
    """Masked next-token cross-entropy over the label tokens (captions in stage 1,
    assistant turns in stage 2), in token chunks (`train.loss_chunk`)."""

    def loss(self, model, params, batch, frozen_extra):
        return step_lib.lm_objective(model, params, batch, frozen_extra,
                                     chunk_size=self.chunk_size)


class DirectPreference(Objective):
    """DPO against a frozen copy of the initial parameters (the reference policy)."""

    data_mode = "dpo"

    def __init__(self, beta: float = 0.1, chunk_size: int = 2048):
        super().__init__(chunk_size)
        self.beta = float(beta)
        if self.beta <= 0:
            raise ValueError(f"stage.objective_kwargs.beta must be > 0, got {beta}")

    def check(self, trainable_paths):
        if any(p.startswith("vision_tower/") for p in trainable_paths):
            raise ValueError("DPO shares one vision-tower pass between policy and reference; "
                             "keep vision_tower frozen in stage.trainable")

    def setup(self, params, frozen_dtype):
        return {"ref": partition.cast_floating(params, frozen_dtype)}

    def loss(self, model, params, batch, frozen_extra):
        return step_lib.dpo_objective(model, params, batch, frozen_extra, beta=self.beta,
                                      chunk_size=self.chunk_size)


def register_objective(name: str, cls: type) -> type:
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise TypeError(f"objective {name!r} must be an Objective subclass, got {cls!r}")
    _OBJECTIVES[name] = cls
    return cls


def names() -> list[str]:
    return sorted(_OBJECTIVES)


def data_mode(name: str) -> str:
    """The pipeline mode the registered objective `name` reads."""
    return _OBJECTIVES[name].data_mode


def make_objective(stage, chunk_size: int) -> Objective:
    """The objective `stage.objective` names, with `stage.objective_kwargs`."""
    name = stage.objective
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown stage.objective {name!r}; known: {names()}")
    kwargs = dict(stage.get("objective_kwargs") or {})
    kwargs.setdefault("chunk_size", chunk_size)
    try:
        return _OBJECTIVES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"stage.objective_kwargs for {name!r}: {e}") from None


register_objective("lm", LanguageModeling)
register_objective("dpo", DirectPreference)

# Objectives with their own module register themselves on import (after the names above
# exist: they import them).
from mllm_jax.train import blip2_stage1  # noqa: E402, F401
