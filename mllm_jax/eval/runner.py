"""`mllm-jax eval`: benchmarks on a checkpoint, written in lmms-eval's layout.

For each task: its samples are read (`mllm_jax.eval.tasks`), turned into prompts (the
question and the task's answer-format suffix; optionally K in-context demonstrations from
the same data and a chain-of-thought instruction), answered in left-padded batches and
scored with the task's own `process_result` / `aggregate`.

Files, under `<output>/<model name>/` (the model name is the checkpoint path's last two
parts, as lmms-eval sanitizes it):
  `<date>_results.json`           "results" {task: {"alias", "<metric>,none",
                                  "<metric>_stderr,none"}}, "configs", "versions", "n-shot",
                                  "higher_is_better", "n-samples", "config", "date", ...
  `<date>_samples_<task>.jsonl`   (unless --no-log-samples) one line per sample: "doc_id", "doc",
                                  "target", "arguments" [prompt, generation kwargs],
                                  "resps" [raw answer], "filtered_resps" (the scored answer),
                                  "input", "input_media" (images in prompt order),
                                  "doc_hash" and the sample's own metric values.
A stderr is the standard error of the mean when the metric is the mean of a per-sample
value of the same name (lmms-eval's mean_stderr), "N/A" otherwise.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import sys
import time

import numpy as np

from mllm_jax.models import registry

COT_INSTRUCTION = ("\nFirst explain your reasoning step by step, then give the final answer "
                   "after 'Answer:'.")
COT_MAX_NEW_TOKENS = 512
FILTER = "none"
DTYPES = ("float32", "bfloat16", "float16")


# ---- command line ------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `eval` subcommand's arguments."""
    parser.add_argument("--ckpt", help="HF checkpoint directory with its tokenizer "
                        "(tokenizer.model or tokenizer.json); required unless --copy-to")
    parser.add_argument("--task", required=True, help="task name, or a comma list: pope, "
                        "vqav2, gqa, mme, chair, scienceqa, coco_caption")
    parser.add_argument("--data", required=True, help="the task's annotation file, or a "
                        "TFDS copy made with --copy-to (a comma list, one per task, with "
                        "several tasks)")
    parser.add_argument("--copy-to", default=None, metavar="DIR",
                        help="write a TFDS (array_record) copy of each task's samples, images "
                             "included, under DIR and exit (no model needed)")
    parser.add_argument("--image-root", default=None, help="directory the data's image "
                        "paths are relative to (a comma list, one per task, allowed)")
    parser.add_argument("--output", default="eval_results",
                        help="results directory (default: eval_results)")
    parser.add_argument("--limit", type=int, default=None, help="first N samples per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--template", default="vicuna_v1", help="conversation template")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="parameter dtype (default: as stored)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default: the task's (with --cot, {COT_MAX_NEW_TOKENS})")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy; otherwise sample at this temperature")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="a stop string (repeatable): ends an answer and is cut from it "
                             "(greedy and sampling)")
    parser.add_argument("--num-fewshot", type=int, default=0,
                        help="in-context demonstrations (image, question, answer) per prompt, "
                             "drawn from the same data")
    parser.add_argument("--cot", action="store_true", help="ask for reasoning, then the answer "
                        "after 'Answer:' (tasks whose answer is read from the end)")
    parser.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                        help="decode on a device mesh, e.g. data=-1 (batches split over "
                             "all devices) or data=2,tensor=4; default: one device")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the few-shot draws and sampling")
    parser.add_argument("--no-log-samples", dest="log_samples", action="store_false",
                        help="skip the per-sample JSONL (written by default)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """The settings of one `mllm-jax eval` run, one field per command-line option (the
    option's name with "_" for "-"; `log_samples` is --no-log-samples inverted), with the
    command line's defaults. Keyword-only; `task` and `data` are required, and `ckpt` is
    unless `copy_to` is given:

        runner.evaluate(runner.EvalOptions(ckpt="ckpts/llava", task="pope",
                                           data="coco_pope_random.json"))

    `EvalOptions.from_args` builds one from the parsed command line. Values that cannot
    be right (a batch size below 1, a negative --num-fewshot, ...) raise ValueError here,
    before anything is loaded.
    """

    "What to evaluate: the checkpoint, the task(s), their data and how much of it."
    ckpt: str | None = None
    """HF checkpoint directory with its tokenizer; required unless `copy_to`."""
    task: str
    """A task name, or a comma list of them (pope, vqav2, gqa, mme, chair, ...)."""
    data: str
    """Each task's annotation file or TFDS copy, comma separated, one per task."""
    image_root: str | None = None
    """Directory the data's image paths are relative to (one, or a comma list per task)."""
    limit: int | None = None
    """Evaluate only the first N samples of each task (None: all)."""

    "Where results go."
    output: str = "eval_results"
    """Results directory; files are written under `<output>/<model name>/`."""
    log_samples: bool = True
    """Write the per-sample JSONL next to the results JSON."""
    copy_to: str | None = None
    """Write a TFDS copy of each task's samples under this directory instead of
    evaluating (no checkpoint needed)."""

    "How prompts are built."
    template: str = "vicuna_v1"
    """Conversation template the prompts are rendered with."""
    num_fewshot: int = 0
    """In-context demonstrations per prompt, drawn from the same data."""
    cot: bool = False
    """Ask for reasoning, then the answer after 'Answer:' (tasks read from the end)."""
    seed: int = 0
    """Seeds the few-shot draws and sampling."""

    "How answers are generated."
    max_new_tokens: int | None = None
    """Answer length cap (None: the task's own, or COT_MAX_NEW_TOKENS with `cot`)."""
    num_beams: int = 1
    """Beam search with this many beams when > 1."""
    length_penalty: float = 1.0
    """Beam search's length penalty exponent."""
    temperature: float = 0.0
    """0: greedy; otherwise sample at this temperature."""
    top_k: int = 0
    """Sampling: keep the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Sampling: nucleus mass (1.0: off)."""
    stop: tuple[str, ...] | None = None
    """Stop strings: each ends an answer and is cut from it (a list or one string is
    taken too, and stored as a tuple)."""

    "How the model runs."
    batch_size: int = 8
    """Prompts decoded together."""
    dtype: str | None = None
    """Parameter dtype, one of DTYPES (None: as stored)."""
    mesh: str | None = None
    """Device mesh to decode on, "AXIS=SIZE,..." (e.g. data=-1); None: one device."""

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not self.ckpt and not self.copy_to:
            raise ValueError("mllm-jax eval needs --ckpt (or --copy-to to copy the data only)")
        _check(self.limit is None or self.limit >= 1, "--limit", self.limit, ">= 1",
               "leave it unset to evaluate every sample")
        _check(self.num_fewshot >= 0, "--num-fewshot", self.num_fewshot, ">= 0",
               "use 0 for prompts without demonstrations")
        _check(self.batch_size >= 1, "--batch-size", self.batch_size, ">= 1",
               "give the number of prompts to decode together")
        _check(self.max_new_tokens is None or self.max_new_tokens >= 1, "--max-new-tokens",
               self.max_new_tokens, ">= 1", "leave it unset for the task's own length")
        _check(self.num_beams >= 1, "--num-beams", self.num_beams, ">= 1",
               "use 1 for no beam search")
        _check(self.temperature >= 0, "--temperature", self.temperature, ">= 0",
               "use 0 for greedy decoding")
        _check(self.top_k >= 0, "--top-k", self.top_k, ">= 0", "use 0 to turn it off")
        _check(0 <= self.top_p <= 1, "--top-p", self.top_p, "in [0, 1]",
               "use 1.0 to turn it off")
        _check(self.dtype is None or self.dtype in DTYPES, "--dtype", self.dtype,
               f"one of {', '.join(DTYPES)}", "leave it unset to keep the stored dtype")
        _check(all(self.stop or ()), "--stop", self.stop, "non-empty strings",
               "drop the empty stop string")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EvalOptions":
        """The options of a parsed `mllm-jax eval` command line (`add_arguments`'s parser);
        attributes it does not have keep their defaults, others (command, func) are
        ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def _check(ok: bool, flag: str, value, rule: str, hint: str) -> None:
    if not ok:
        field = flag.lstrip("-").replace("-", "_")
        raise ValueError(f"{flag} must be {rule}, got {value!r} (EvalOptions.{field}); {hint}")


def _as_options(options) -> EvalOptions:
    if isinstance(options, EvalOptions):
        return options
    if isinstance(options, argparse.Namespace):
        raise TypeError("pass an EvalOptions, not an argparse Namespace: build it with "
                        "EvalOptions.from_args(args)")
    raise TypeError(f"expected an EvalOptions, got {type(options).__name__}")


def _split(text):
    return [t.strip() for t in text.split(",")] if text else []


def task_inputs(options: EvalOptions) -> list[tuple[str, str, str | None]]:
    """(task name, data path, image root) per task of --task / --data / --image-root."""
    names, data, roots = (_split(options.task), _split(options.data),
                          _split(options.image_root))
    if not names:
        raise ValueError("--task names no task")
    if len(set(names)) != len(names):
        raise ValueError(f"--task names a task twice: {options.task}")
    if len(data) != len(names):
        raise ValueError(f"--data has {len(data)} path(s) for {len(names)} task(s) "
                         f"({', '.join(names)}); give one path per task, comma separated")
    if len(roots) > 1 and len(roots) != len(names):
        raise ValueError(f"--image-root has {len(roots)} directories for {len(names)} tasks; "
                         f"give one, or one per task")
    roots = roots * len(names) if len(roots) == 1 else roots or [None] * len(names)
    return list(zip(names, data, roots))


def generation_kwargs(options: EvalOptions, task) -> dict:
    """`generate` keywords for a task (JSON-serializable; the sampling key is added later)."""
    if options.max_new_tokens is not None:
        max_new = options.max_new_tokens
    else:
        max_new = COT_MAX_NEW_TOKENS if uses_cot(options, task) else task.max_new_tokens
    gen = {"max_new_tokens": int(max_new)}
    if options.temperature > 0:
        gen.update(do_sample=True, temperature=options.temperature, top_k=options.top_k,
                   top_p=options.top_p)
    if options.num_beams != 1 or options.length_penalty != 1.0:
        gen.update(num_beams=options.num_beams, length_penalty=options.length_penalty)
    if options.stop:
        gen["stop_strings"] = list(options.stop)
    return gen


def parse_mesh(text):
    """A `jax.sharding.Mesh` from "data=-1,fsdp=1,tensor=2" (unnamed axes are 1), or None."""
    if not text:
        return None
    from mllm_jax import sharding
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in _split(text):
        axis, eq, size = part.partition("=")
        if not eq or axis not in sizes or not re.fullmatch(r"-?\d+", size.strip()):
            raise ValueError(f"--mesh {text!r}: expected AXIS=SIZE pairs with AXIS in "
                             f"{sorted(sizes)}, e.g. data=-1 or data=2,tensor=4")
        sizes[axis] = int(size)
    return sharding.make_mesh(sharding.mesh_config(**sizes))


def uses_cot(options: EvalOptions, task) -> bool:
    return bool(options.cot and task.answer_from_end)


# ---- prompts -----------------------------------------------------------------------------

def answer_text(task, sample) -> str:
    """A demonstration's answer: the task's own rendering when it has one, else the target
    (the most common one of a list of reference answers)."""
    if hasattr(task, "target_text"):
        return str(task.target_text(sample))
    target = sample.target
    if isinstance(target, int) and not isinstance(target, bool) and \
            "num_options" in sample.meta:  # a choice index: its letter
        return "ABCDEFGHIJ"[target]
    if isinstance(target, (list, tuple)) and target:
        return str(collections.Counter(map(str, target)).most_common(1)[0][0])
    return str(target)


def user_text(sample, suffix: str) -> str:
    return "<image>\n" * len(sample.images) + sample.question + suffix


def fewshot_indices(n: int, query: int, k: int, seed: int) -> list[int]:
    """K distinct sample indices other than `query`, the same for the same (seed, query)."""
    if k >= n:
        raise ValueError(f"--num-fewshot {k} needs at least {k + 1} samples in the data, "
                         f"got {n}")
    rng = np.random.default_rng([seed, query])
    picks = rng.choice(n - 1, size=k, replace=False)
    return [int(i) + (i >= query) for i in picks]


def build_conversation(task, pool, query: int, *, suffix: str, demos=(), cot=False):
    """The user message for pool[query]: the demonstrations pool[i] for i in `demos`
    ("<image>\\nQ<suffix>\\nA", blank line separated; with `cot` the answer reads
    "Answer: A", the format asked for), then the query; the images in the same order."""
    from mllm_jax.infer.batching import Conversation
    demos = [pool[i] for i in demos]
    sample = pool[query]
    answer = "Answer: {}" if cot else "{}"
    parts = [user_text(d, suffix) + "\n" + answer.format(answer_text(task, d)) for d in demos]
    parts.append(user_text(sample, suffix))
    images = [img for d in demos for img in d.images] + list(sample.images)
    return Conversation([{"from": "human", "value": "\n\n".join(parts)}], images,
                        sample_id=sample.sample_id)


# ---- scoring and records -----------------------------------------------------------------

def _number(v):
    return isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating))


def stderr_of(metric: str, value, processed: list[dict]):
    """Standard error of the mean when `value` is the mean of the per-sample `metric`."""
    items = [p.get(metric) for p in processed]
    if len(items) < 2 or not all(_number(x) for x in items) or not _number(value):
        return "N/A"
    arr = np.asarray(items, np.float64)
    if not math.isclose(float(arr.mean()), float(value), rel_tol=1e-9, abs_tol=1e-12):
        return "N/A"
    return float(arr.std(ddof=1) / math.sqrt(len(arr)))


def task_results(name, metrics: dict, processed: list[dict]) -> dict:
    out = {"alias": name}
    for metric, value in metrics.items():
        out[f"{metric},{FILTER}"] = _plain(value)
        out[f"{metric}_stderr,{FILTER}"] = stderr_of(metric, value, processed)
    return out


def _plain(v):
    """JSON-friendly values (numpy scalars and arrays to Python)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    return v


def _dumps(obj, **kw):
    return json.dumps(_plain(obj), ensure_ascii=False, default=str, **kw)


def sample_record(sample, prompt: str, images, gen: dict, response: str, filtered: str,
                  processed: dict) -> dict:
    from mllm_jax.infer.batching import image_label
    doc = {"sample_id": sample.sample_id, "question": sample.question,
           "target": sample.target, "meta": sample.meta,
           "images": [image_label(i) for i in sample.images]}
    record = {"doc_id": sample.doc_id, "doc": _plain(doc), "target": str(sample.target),
              "arguments": [prompt, gen], "resps": [response], "filtered_resps": filtered,
              "input": prompt, "input_media": [image_label(i) for i in images],
              "doc_hash": _sha256(_dumps(doc, indent=2))}
    record.update(_plain(processed))
    return record


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sanitize_model_name(path: str) -> str:
    """The checkpoint path's last two parts joined by "__" (lmms-eval's directory name)."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return re.sub(r"[\"<>:/\|\\?\*\[\]]+", "__", "/".join(parts[-2:]))


# ---- one task ----------------------------------------------------------------------------

def check_images(name, samples):
    """Every image given as a path exists (a missing file fails before any generation)."""
    for s in samples:
        for image in s.images:
            if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
                raise FileNotFoundError(f"task {name!r}, sample {s.sample_id!r}: image file "
                                        f"{os.fspath(image)!r} does not exist")


def load_task_samples(name, data, image_root):
    from mllm_jax.eval import tasks
    task = tasks.get_task(name)  # an unknown name is a ValueError listing the known ones
    if not os.path.exists(data):
        raise FileNotFoundError(f"task {name!r}: data {data!r} does not exist")
    if image_root is not None and not os.path.isdir(image_root):
        raise FileNotFoundError(f"task {name!r}: image root {image_root!r} is not a directory")
    from mllm_jax.eval import tfds_copy
    try:
        if tfds_copy.is_copy(data):
            return task, tfds_copy.read_copy(task, data)
        return task, task.load(data, image_root=image_root)
    except ValueError as e:
        raise ValueError(f"task {name!r}: {e}") from e


def run_task(runtime, options: EvalOptions, name, data, image_root):
    """(results entry, records, info) for one task."""
    from tqdm import tqdm

    from mllm_jax.data.templates import render_text
    from mllm_jax.infer import batching
    model, params, tokenizer, image_cfg, mesh = runtime
    task, pool = load_task_samples(name, data, image_root)
    if not pool:
        raise ValueError(f"task {name!r}: no samples in {data!r}")
    n_eval = len(pool) if options.limit is None else min(options.limit, len(pool))
    samples = pool[:n_eval]
    demos = [fewshot_indices(len(pool), i, options.num_fewshot, options.seed)
             if options.num_fewshot else [] for i in range(n_eval)]
    check_images(name, [pool[i] for i in sorted(set(range(n_eval)).union(*demos))])
    cot = uses_cot(options, task)
    suffix = COT_INSTRUCTION if cot else task.prompt_suffix
    conversations = [build_conversation(task, pool, i, suffix=suffix, demos=demos[i], cot=cot)
                     for i in range(n_eval)]
    gen = generation_kwargs(options, task)
    sampling = {} if mesh is None else {"mesh": mesh}
    if gen.get("do_sample"):
        import jax
        sampling["rng"] = jax.random.fold_in(jax.random.PRNGKey(options.seed), _stable(name))
    with tqdm(total=n_eval, desc=name, file=sys.stderr) as bar:
        try:
            responses = batching.generate_all(model, params, tokenizer, image_cfg,
                                              conversations, options.template,
                                              batch_size=options.batch_size,
                                              progress=bar.update, **sampling, **gen)
        except ValueError as e:
            raise ValueError(f"task {name!r}: {e}") from e
    filtered = [task.extract_answer(r) if cot else r for r in responses]
    processed = [task.process_result(s, f) for s, f in zip(samples, filtered)]
    metrics = task.aggregate(processed, samples)
    records = [sample_record(s, render_text(c.messages, options.template, tokenizer,
                                            generation=True),
                             c.images, gen, r, f, p)
               for s, c, r, f, p in zip(samples, conversations, responses, filtered, processed)]
    info = {"task": task, "original": len(pool), "effective": n_eval, "gen": gen,
            "suffix": suffix, "cot": cot}
    return task_results(name, metrics, processed), records, info


def _stable(name: str) -> int:
    return int(_sha256(name)[:8], 16)


def task_config(name, data, image_root, info, options: EvalOptions) -> dict:
    task = info["task"]
    return {"task": name, "output_type": task.output_type, "dataset_path": data,
            "image_root": image_root, "num_fewshot": options.num_fewshot,
            "fewshot_seed": options.seed, "prompt_suffix": info["suffix"], "cot": info["cot"],
            "answer_from_end": task.answer_from_end, "template": options.template,
            "generation_kwargs": info["gen"]}


# ---- the run -----------------------------------------------------------------------------

def load_runtime(options: EvalOptions):
    """(model, params, tokenizer, image preprocessing config, mesh or None) of the
    checkpoint; with a mesh, the parameters are sharded on it once."""
    from mllm_jax.convert import load_hf
    from mllm_jax.data.tokenizer import load_tokenizer
    from mllm_jax.infer.generate import place_on_mesh
    from mllm_jax.infer.prompting import image_config_for
    mesh = parse_mesh(options.mesh)
    model, params = load_hf(options.ckpt, dtype=options.dtype)
    if mesh is not None:
        params = place_on_mesh(model, params, mesh, None, None)[0]
    image_cfg = (image_config_for(model, options.ckpt) if registry.is_multimodal(model.cfg)
                 else None)
    return model, params, load_tokenizer(options.ckpt), image_cfg, mesh


def evaluate(options: EvalOptions, runtime=None) -> dict:
    """Runs every task of `options`; returns the results dict (and its "samples" per task).
    `runtime`: load_runtime's tuple, when the checkpoint is already loaded."""
    import jax
    options = _as_options(options)
    inputs = task_inputs(options)
    start = time.perf_counter()
    runtime = runtime or load_runtime(options)
    results, samples, configs, versions, n_shot, hib, n_samples = {}, {}, {}, {}, {}, {}, {}
    for name, data, root in inputs:
        entry, records, info = run_task(runtime, options, name, data, root)
        task = info["task"]
        results[name], samples[name] = entry, records
        configs[name] = task_config(name, data, root, info, options)
        versions[name] = getattr(task, "version", "N/A")
        n_shot[name] = options.num_fewshot
        declared = getattr(task, "higher_is_better", None) or {}
        hib[name] = {k.split(",")[0]: declared.get(k.split(",")[0]) for k in entry
                     if k != "alias" and "_stderr," not in k}
        n_samples[name] = {"original": info["original"], "effective": info["effective"]}
    model_name = os.path.abspath(options.ckpt)
    gen_cli = {"max_new_tokens": options.max_new_tokens, "temperature": options.temperature,
               "top_k": options.top_k, "top_p": options.top_p,
               "num_beams": options.num_beams, "length_penalty": options.length_penalty}
    end = time.perf_counter()
    return {
        "results": results,
        "group_subtasks": {name: [] for name in results},
        "configs": dict(sorted(configs.items())),
        "versions": dict(sorted(versions.items())),
        "n-shot": dict(sorted(n_shot.items())),
        "higher_is_better": dict(sorted(hib.items())),
        "n-samples": n_samples,
        "config": {"model": "mllm_jax", "model_args": f"pretrained={model_name}",
                   "checkpoint": model_name, "template": options.template,
                   "model_backend": "mllm_jax.infer.generate",
                   "batch_size": options.batch_size, "batch_sizes": [],
                   "device": jax.default_backend(), "limit": options.limit,
                   "gen_kwargs": gen_cli, "num_fewshot": options.num_fewshot,
                   "cot": options.cot, "random_seed": options.seed,
                   "fewshot_seed": options.seed, "dtype": options.dtype,
                   "mesh": options.mesh},
        "model_name": model_name,
        "model_name_sanitized": sanitize_model_name(options.ckpt),
        "start_time": start, "end_time": end,
        "total_evaluation_time_seconds": str(end - start),
        "samples": samples,
    }


def write_outputs(results: dict, output: str, date: str, log_samples: bool) -> list[str]:
    """Writes the results JSON (and samples JSONL files); returns the paths written."""
    samples = results.pop("samples")
    results["date"] = date
    directory = os.path.join(output, results["model_name_sanitized"])
    os.makedirs(directory, exist_ok=True)
    date_id = date.replace(":", "-")
    written = []
    if log_samples:
        results["task_hashes"] = {
            name: _sha256("".join(f"sample_{i}" + r["doc_hash"] for i, r in enumerate(recs)))
            for name, recs in samples.items()}
        for name, records in samples.items():
            path = os.path.join(directory, f"{date_id}_samples_{name}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(_dumps(r) + "\n")
            written.append(path)
    else:
        results["task_hashes"] = {}
    path = os.path.join(directory, f"{date_id}_results.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_dumps(results, indent=2))
    return [path] + written


def _fmt(v):
    if v is None or v == "N/A":
        return "N/A"
    return "%.4f" % v if isinstance(v, float) else str(v)


def make_table(results: dict) -> str:
    """A Markdown table of the results (lmms-eval's columns)."""
    rows = [["Tasks", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]]
    symbols = {True: "↑", False: "↓"}
    for name, entry in results["results"].items():
        hib = results.get("higher_is_better", {}).get(name, {})
        for key in sorted(k for k in entry if k != "alias" and "_stderr," not in k):
            metric, _, filt = key.partition(",")
            rows.append([entry.get("alias", name), filt, str(results["n-shot"].get(name, "")),
                         metric, symbols.get(hib.get(metric), ""), _fmt(entry[key]), "±",
                         _fmt(entry.get(f"{metric}_stderr,{filt}"))])
    widths = [max(1, *(len(r[c]) for r in rows)) for c in range(len(rows[0]))]
    lines = ["|" + "|".join(c.ljust(w) for c, w in zip(r, widths)) + "|" for r in rows]
    lines.insert(1, "|" + "|".join("-" * w for w in widths) + "|")
    return "\n".join(lines)


def write_copies(options: EvalOptions) -> int:
    """--copy-to: each task's samples (all of them, or --limit) as a TFDS copy."""
    from mllm_jax.eval import tfds_copy
    for name, data, root in task_inputs(options):
        task, samples = load_task_samples(name, data, root)
        samples = samples if options.limit is None else samples[:options.limit]
        check_images(name, samples)
        path = tfds_copy.write_copy(task, samples, options.copy_to)
        print(f"{name}: {len(samples)} samples copied to {path} (pass it as --data)")
    return 0


def main(options: EvalOptions) -> int:
    """Runs `mllm-jax eval` (`EvalOptions.from_args` of its command line); prints the table
    and the paths written."""
    options = _as_options(options)
    if options.copy_to:
        return write_copies(options)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
    results = evaluate(options)
    import jax
    if jax.process_index() != 0:  # every process holds the same results; one writes them
        return 0
    written = write_outputs(results, options.output, date, options.log_samples)
    print(f"mllm_jax ({results['config']['model_args']}), gen_kwargs: "
          f"({results['config']['gen_kwargs']}), limit: {options.limit}, num_fewshot: "
          f"{options.num_fewshot}, batch_size: {options.batch_size}")
    print(make_table(results))
    for path in written:
        print(f"wrote {path}")
    return 0
