"""Evaluation: benchmark runs on a checkpoint in lmms-eval's layout (`evaluate` with
`EvalOptions`, what `mllm-jax eval` runs), the benchmark tasks (`get_task`; see
`mllm_jax.eval.tasks`), and the official scorers re-implemented: VQA accuracy, POPE, MME,
ScienceQA, CIDEr-D, BLEU and ROUGE-L, CHAIR; lmms-eval 0.7.3's scoring of the same
benchmarks is `mllm_jax.eval.lmms_eval_scoring` (`EvalOptions(scoring="lmms_eval")`).
"""
from mllm_jax.eval.caption import bleu, cider_d, ptb_tokenize
from mllm_jax.eval.chair import ChairEvaluator
from mllm_jax.eval.mme import mme_scores
from mllm_jax.eval.pope import pope_metrics, pope_metrics_by_split
from mllm_jax.eval.rouge import rouge_l
from mllm_jax.eval.runner import EvalOptions, evaluate
from mllm_jax.eval.scienceqa import scienceqa_accuracy, scienceqa_category_accuracy
from mllm_jax.eval.tasks import Sample, Task, get_task
from mllm_jax.eval.vqa import normalize_answer, vqa_accuracy, vqa_score

__all__ = ["evaluate", "EvalOptions", "get_task", "Task", "Sample",
           "vqa_accuracy", "vqa_score", "normalize_answer",
           "pope_metrics", "pope_metrics_by_split", "mme_scores",
           "scienceqa_accuracy", "scienceqa_category_accuracy",
           "cider_d", "bleu", "rouge_l", "ptb_tokenize", "ChairEvaluator"]
