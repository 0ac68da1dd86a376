"""`mllm-jax eval`: benchmarks on a checkpoint, written in lmms-eval's layout.

For each task: its samples are read (`mllm_jax.eval.tasks`), turned into prompts (the
question and the task's answer-format suffix; optionally K in-context demonstrations from
the same data and a chain-of-thought instruction), answered in left-padded batches and
scored with the task's own `process_result` / `aggregate`, as the benchmark's official script
does or as lmms-eval does (`EvalOptions.scoring`, recorded in "config" and each task's
"configs" entry, and shown in the table).

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

import collections
import datetime
import hashlib
import json
import math
import os
import re
import sys
import time
import typing

import numpy as np

from mllm_jax import sharding
from mllm_jax.eval.options import (COT_MAX_NEW_TOKENS, EvalOptions,  # noqa: F401
                                   add_arguments, as_options)
from mllm_jax.eval.tasks.base import LETTER_ANSWER, SHORT_ANSWER
from mllm_jax.models import registry

if typing.TYPE_CHECKING:
    from mllm_jax.infer.chat_template import RecordedTemplate

# The eval tasks' answer-format instructions, by the kind a checkpoint records a replacement
# for (`infer.chat_template`, "prompt_suffixes").
SUFFIX_KINDS = {SHORT_ANSWER: "short_answer", LETTER_ANSWER: "letter_answer"}
COT_INSTRUCTION = ("\nFirst explain your reasoning step by step, then give the final answer "
                   "after 'Answer:'.")
FILTER = "none"


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


def prompting_for(options: EvalOptions) -> "RecordedTemplate":
    """The template, system prompt and suffixes to prompt the checkpoint with: --template
    when given, else what the checkpoint records (`infer.chat_template`), else vicuna_v1."""
    from mllm_jax.infer.chat_template import resolve_template
    return resolve_template(options.ckpt, options.template)


def prompt_suffix(options: EvalOptions, task, prompting: "RecordedTemplate") -> str:
    """What follows each question: the chain-of-thought instruction with --cot, else
    --prompt-suffix when given, else the checkpoint's recorded text for the kind of the
    task's answer-format instruction, else the task's own."""
    if uses_cot(options, task):
        return COT_INSTRUCTION
    if options.prompt_suffix is not None:
        return options.prompt_suffix
    kind = SUFFIX_KINDS.get(task.prompt_suffix)
    return prompting.prompt_suffixes.get(kind, task.prompt_suffix)


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


def user_text(sample, suffix: str, question_format: str = "{}") -> str:
    return "<image>\n" * len(sample.images) + question_format.replace(
        "{}", sample.question + suffix)


def fewshot_indices(n: int, query: int, k: int, seed: int) -> list[int]:
    """K distinct sample indices other than `query`, the same for the same (seed, query)."""
    if k >= n:
        raise ValueError(f"--num-fewshot {k} needs at least {k + 1} samples in the data, "
                         f"got {n}")
    rng = np.random.default_rng([seed, query])
    picks = rng.choice(n - 1, size=k, replace=False)
    return [int(i) + (i >= query) for i in picks]


def build_conversation(task, pool, query: int, *, suffix: str, demos=(), cot=False,
                       question_format: str = "{}"):
    """The user message for pool[query]: the demonstrations pool[i] for i in `demos`
    ("<image>\\nQ<suffix>\\nA", blank line separated; with `cot` the answer reads
    "Answer: A", the format asked for), then the query; the images in the same order."""
    from mllm_jax.infer.batching import Conversation
    demos = [pool[i] for i in demos]
    sample = pool[query]
    answer = "Answer: {}" if cot else "{}"
    parts = [user_text(d, suffix, question_format) + "\n" + answer.format(answer_text(task, d))
             for d in demos]
    parts.append(user_text(sample, suffix, question_format))
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


def load_task_samples(name, data, image_root, allow_absolute_image_paths=False):
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
        return task, task.load(data, image_root=image_root,
                               allow_absolute_image_paths=allow_absolute_image_paths)
    except ValueError as e:
        raise ValueError(f"task {name!r}: {e}") from e


def run_task(runtime, options: EvalOptions, name, data, image_root, prompting=None):
    """(results entry, records, info) for one task; `prompting`: `prompting_for(options)`
    (read from the checkpoint when not given)."""
    from tqdm import tqdm

    from mllm_jax.data.templates import render_text
    from mllm_jax.infer import batching
    model, params, tokenizer, image_cfg, mesh = runtime
    task, pool = load_task_samples(name, data, image_root,
                                   options.allow_absolute_image_paths)
    if not pool:
        raise ValueError(f"task {name!r}: no samples in {data!r}")
    n_eval = len(pool) if options.limit is None else min(options.limit, len(pool))
    samples = pool[:n_eval]
    demos = [fewshot_indices(len(pool), i, options.num_fewshot, options.seed)
             if options.num_fewshot else [] for i in range(n_eval)]
    check_images(name, [pool[i] for i in sorted(set(range(n_eval)).union(*demos))])
    prompting = prompting or prompting_for(options)
    cot = uses_cot(options, task)
    suffix = prompt_suffix(options, task, prompting)
    conversations = [build_conversation(task, pool, i, suffix=suffix, demos=demos[i], cot=cot,
                                        question_format=options.prompt_format)
                     for i in range(n_eval)]
    gen = generation_kwargs(options, task)
    sampling = ({} if mesh is None else
                {"mesh": mesh, "rules": sharding.named_rules(options.rules)})
    if gen.get("do_sample"):
        import jax
        sampling["rng"] = jax.random.fold_in(jax.random.PRNGKey(options.seed), _stable(name))
    # A family whose HF processor builds its inputs (BLIP-2) encodes them itself.
    encoder = batching.prompt_encoder_for(model, options.ckpt)
    with tqdm(total=n_eval, desc=name, file=sys.stderr) as bar:
        try:
            responses = batching.generate_all(model, params, tokenizer, image_cfg,
                                              conversations, prompting.template(),
                                              system=prompting.system,
                                              batch_size=options.batch_size,
                                              progress=bar.update,
                                              prompt_encoder=encoder, **sampling, **gen)
        except ValueError as e:
            raise ValueError(f"task {name!r}: {e}") from e
    filtered = [task.extract_answer(r) if cot else r for r in responses]
    processed = [task.process_result(s, f, options.scoring) for s, f in zip(samples, filtered)]
    metrics = task.aggregate(processed, samples, options.scoring)
    def shown(c):  # the prompt text as the model read it
        if encoder is not None:
            return encoder.render(c)
        return render_text(c.messages, prompting.template(), tokenizer,
                           system=prompting.system, generation=True)
    records = [sample_record(s, shown(c), c.images, gen, r, f, p)
               for s, c, r, f, p in zip(samples, conversations, responses, filtered, processed)]
    info = {"task": task, "original": len(pool), "effective": n_eval, "gen": gen,
            "suffix": suffix, "cot": cot,
            "template": prompting.name if encoder is None else None,
            "system": prompting.system if encoder is None else None}
    return task_results(name, metrics, processed), records, info


def _stable(name: str) -> int:
    return int(_sha256(name)[:8], 16)


def task_config(name, data, image_root, info, options: EvalOptions) -> dict:
    task = info["task"]
    return {"task": name, "output_type": task.output_type, "dataset_path": data,
            "image_root": image_root, "num_fewshot": options.num_fewshot,
            "fewshot_seed": options.seed, "prompt_suffix": info["suffix"],
            "prompt_format": options.prompt_format, "cot": info["cot"],
            "answer_from_end": task.answer_from_end, "scoring": options.scoring,
            "template": info["template"],
            "system_prompt": info["system"],
            "generation_kwargs": info["gen"]}


# ---- the run -----------------------------------------------------------------------------

def load_runtime(options: EvalOptions):
    """(model, params, tokenizer, image preprocessing config, mesh or None) of the
    checkpoint; with a mesh, the parameters are sharded on it once."""
    from mllm_jax.convert import load_hf
    from mllm_jax.data.tokenizer import load_tokenizer
    from mllm_jax.infer.generate import place_on_mesh, with_compute_dtype
    from mllm_jax.infer.prompting import image_config_for
    mesh = parse_mesh(options.mesh)
    model, params = load_hf(options.ckpt, dtype=options.param_dtype, check_finite=True)
    model = with_compute_dtype(model, options.dtype)
    if mesh is not None:
        params = place_on_mesh(model, params, mesh, None, None,
                               rules=sharding.named_rules(options.rules))[0]
    image_cfg = (image_config_for(model, options.ckpt) if registry.is_multimodal(model.cfg)
                 else None)
    return model, params, load_tokenizer(options.ckpt), image_cfg, mesh


def evaluate(options: EvalOptions, runtime=None) -> dict:
    """Runs every task of `options`; returns the results dict (and its "samples" per task).
    `runtime`: load_runtime's tuple, when the checkpoint is already loaded."""
    import jax
    options = as_options(options)
    inputs = task_inputs(options)
    from mllm_jax.eval import tasks
    for name, _, _ in inputs:  # an unknown task, or a scoring it cannot run, before loading
        tasks.get_task(name).require_scoring(options.scoring)
    start = time.perf_counter()
    prompting = prompting_for(options)
    runtime = runtime or load_runtime(options)
    results, samples, configs, versions, n_shot, hib, n_samples = {}, {}, {}, {}, {}, {}, {}
    for name, data, root in inputs:
        entry, records, info = run_task(runtime, options, name, data, root, prompting)
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
                   "checkpoint": model_name, "template": prompting.name,
                   "model_backend": "mllm_jax.infer.generate",
                   "batch_size": options.batch_size, "batch_sizes": [],
                   "device": jax.default_backend(), "limit": options.limit,
                   "gen_kwargs": gen_cli, "num_fewshot": options.num_fewshot,
                   "cot": options.cot, "random_seed": options.seed,
                   "fewshot_seed": options.seed, "dtype": options.dtype,
                   "param_dtype": options.param_dtype, "mesh": options.mesh,
                   "rules": options.rules, "scoring": options.scoring},
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
    """A Markdown table of the results (lmms-eval's columns, and the scoring)."""
    rows = [["Tasks", "Filter", "n-shot", "Scoring", "Metric", "", "Value", "", "Stderr"]]
    symbols = {True: "↑", False: "↓"}
    for name, entry in results["results"].items():
        hib = results.get("higher_is_better", {}).get(name, {})
        scoring = results.get("configs", {}).get(name, {}).get("scoring", "")
        for key in sorted(k for k in entry if k != "alias" and "_stderr," not in k):
            metric, _, filt = key.partition(",")
            rows.append([entry.get("alias", name), filt, str(results["n-shot"].get(name, "")),
                         scoring, metric, symbols.get(hib.get(metric), ""), _fmt(entry[key]),
                         "±", _fmt(entry.get(f"{metric}_stderr,{filt}"))])
    widths = [max(1, *(len(r[c]) for r in rows)) for c in range(len(rows[0]))]
    lines = ["|" + "|".join(c.ljust(w) for c, w in zip(r, widths)) + "|" for r in rows]
    lines.insert(1, "|" + "|".join("-" * w for w in widths) + "|")
    return "\n".join(lines)


def write_copies(options: EvalOptions) -> int:
    """--copy-to: each task's samples (all of them, or --limit) as a TFDS copy."""
    from mllm_jax.eval import tfds_copy
    for name, data, root in task_inputs(options):
        task, samples = load_task_samples(name, data, root,
                                          options.allow_absolute_image_paths)
        samples = samples if options.limit is None else samples[:options.limit]
        check_images(name, samples)
        path = tfds_copy.write_copy(task, samples, options.copy_to)
        print(f"{name}: {len(samples)} samples copied to {path} (pass it as --data)")
    return 0


def check_output(path: str, flag: str = "--output", subdirectory: str | None = None):
    """Fails before any work unless `path` (and `path/subdirectory`) is a directory the
    results can be written into, or can be created as one."""
    path = os.path.abspath(path)
    for target in [path] + ([os.path.join(path, subdirectory)] if subdirectory else []):
        if os.path.exists(target) and not os.path.isdir(target):
            raise FileExistsError(f"{flag} {path}: {target} is a file, not a directory; "
                                  f"give a directory for the results (it is created if "
                                  f"missing), or move the file away")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise FileExistsError(f"{flag} {path}: {existing} is a file, so no directory can be "
                              f"created there; give another directory for the results")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable; give a directory you "
                         f"can write to")


def main(options: EvalOptions) -> int:
    """Runs `mllm-jax eval` (`EvalOptions.from_args` of its command line); prints the table
    and the paths written. --output (or --copy-to) is checked before anything is read."""
    options = as_options(options)
    if options.copy_to:
        check_output(options.copy_to, "--copy-to")
        return write_copies(options)
    check_output(options.output, "--output", sanitize_model_name(options.ckpt))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
    results = evaluate(options)
    import jax
    if jax.process_index() != 0:  # every process holds the same results; one writes them
        return 0
    written = write_outputs(results, options.output, date, options.log_samples)
    print(f"mllm_jax ({results['config']['model_args']}), gen_kwargs: "
          f"({results['config']['gen_kwargs']}), limit: {options.limit}, num_fewshot: "
          f"{options.num_fewshot}, batch_size: {options.batch_size}, scoring: "
          f"{options.scoring}")
    print(make_table(results))
    for path in written:
        print(f"wrote {path}")
    return 0
