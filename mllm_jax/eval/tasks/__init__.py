"""Benchmark task definitions for ``mllm-jax eval``: loaders for the published local
formats, LLaVA-1.5 prompts, per-sample scoring and the headline aggregates.

A task turns its benchmark files into ``Sample`` s (``load``), scores one generated
response (``process_result``) and reduces the per-sample results to metric name ->
value (``aggregate``), both with ``scoring="official"`` (the benchmark's own scripts) or
``scoring="lmms_eval"`` (lmms-eval 0.7.3's, ``mllm_jax.eval.lmms_eval_scoring``).
``process_result`` scores the response exactly as given; for chain-of-thought runs, pass
``task.extract_answer(response)`` where ``task.answer_from_end`` is true.  The prompt of a
sample is its ``question`` followed by ``task.prompt_suffix`` (images go before it, as
LLaVA places them).

Metric names follow lmms-eval's tasks (``pope_f1_score``, ``exact_match``,
``mme_perception_score``, ``coco_CIDEr``, ``coco_cap_chair_s``...) and their
scales: fractions for accuracies, MME points, raw CIDEr/BLEU, CHAIR x100.
Official parsing of responses follows LLaVA's evaluation scripts (see the metric modules).
Every loader raises ``ValueError`` naming the file, line or sample and what was
expected; ``image_root`` defaults to the directory holding the data.
"""
from mllm_jax.eval.tasks.base import (CAPTION_PROMPT, DETAIL_PROMPT, LETTER_ANSWER,
                                      SCORINGS, SHORT_ANSWER, Sample, Task)
from mllm_jax.eval.tasks.captions import ChairTask, CocoCaptionTask
from mllm_jax.eval.tasks.choice import ScienceQATask
from mllm_jax.eval.tasks.short_answer import GQATask, VQAv2Task
from mllm_jax.eval.tasks.yes_no import MMETask, PopeTask

__all__ = ["CAPTION_PROMPT", "DETAIL_PROMPT", "LETTER_ANSWER", "SCORINGS", "SHORT_ANSWER",
           "Sample", "Task",
           "ChairTask", "CocoCaptionTask", "ScienceQATask", "GQATask", "VQAv2Task", "MMETask",
           "PopeTask", "TASKS", "get_task"]

TASKS = {t.name: t for t in (PopeTask(), VQAv2Task(), GQATask(), MMETask(), ChairTask(),
                             ScienceQATask(), CocoCaptionTask())}


def get_task(name: str) -> Task:
    """The task registered under ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
