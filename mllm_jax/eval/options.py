"""What `mllm-jax eval` takes: its command-line options (`add_arguments`) and the typed,
validated `EvalOptions` that `runner.evaluate` runs on."""
from __future__ import annotations

import argparse
import dataclasses

from mllm_jax.eval.tasks.base import SCORINGS

# Longest chain-of-thought answer, unless --max-new-tokens says otherwise.
COT_MAX_NEW_TOKENS = 512
DTYPES = ("float32", "bfloat16", "float16")
# The names of `sharding.NAMED_RULES`, the parameter layouts --mesh decodes with.
RULES = ("serving", "training")


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
                        "paths are relative to (a comma list, one per task, allowed); an "
                        "image path leading outside it is an error")
    parser.add_argument("--allow-absolute-image-paths", action="store_true",
                        help="read absolute image paths in the data wherever they are "
                             "(relative paths climbing out with '..' stay refused)")
    parser.add_argument("--output", default="eval_results",
                        help="results directory (default: eval_results)")
    parser.add_argument("--limit", type=int, default=None, help="first N samples per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--template", default=None,
                        help="conversation template (default: the one the checkpoint records "
                             "in its tokenizer_config.json, else vicuna_v1)")
    parser.add_argument("--prompt-suffix", default=None, metavar="TEXT",
                        help="text put after every question in place of the task's "
                             "answer-format instruction (default: what the checkpoint records "
                             "for that kind of instruction, else the task's own)")
    parser.add_argument("--prompt-format", default="{}", metavar="TEXT",
                        help="each question (with its suffix) put into this text at '{}', "
                             "e.g. BLIP-2's zero-shot VQA prompt 'Question: {} Short answer:' "
                             "with --prompt-suffix '' --num-beams 5 --length-penalty -1")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute and KV-cache dtype (default: the checkpoint config's, "
                             "float32); the parameters stay as stored")
    parser.add_argument("--param-dtype", choices=DTYPES, default=None,
                        help="dtype the parameters are loaded in (default: as stored)")
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
    parser.add_argument("--rules", choices=RULES, default="serving",
                        help="how --mesh lays out the parameters: serving (split over "
                             "tensor only, never gathered per token; default) or training "
                             "(also split over fsdp, as the trainer does)")
    parser.add_argument("--scoring", choices=SCORINGS, default="official",
                        help="score answers as each benchmark's official script does "
                             "(default), or as lmms-eval 0.7.3 does (lmms_eval: the numbers "
                             "of papers that report lmms-eval's); recorded in the results")
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
    """Directory the data's image paths are relative to (one, or a comma list per task;
    default: the data's directory). A path resolving outside it (`..`, absolute, a symlink
    out) is an error naming the file and line."""
    allow_absolute_image_paths: bool = False
    """Read absolute image paths (and symlinks) wherever they lead."""
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
    template: str | None = None
    """Conversation template the prompts are rendered with (None: the one the checkpoint
    records, `infer.chat_template.read_chat_template`, else vicuna_v1)."""
    prompt_suffix: str | None = None
    """Text after every question in place of the task's answer-format instruction (e.g.
    "" for the bare question); None: what the checkpoint records for that kind of
    instruction, else the task's own (`prompt_suffix` of `eval.tasks`)."""
    prompt_format: str = "{}"
    """Each question with its suffix put into this text at "{}" (e.g. BLIP-2's zero-shot
    VQA prompt "Question: {} Short answer:", with prompt_suffix "")."""
    num_fewshot: int = 0
    """In-context demonstrations per prompt, drawn from the same data."""
    cot: bool = False
    """Ask for reasoning, then the answer after 'Answer:' (tasks read from the end)."""
    seed: int = 0
    """Seeds the few-shot draws and sampling."""

    "How answers are scored."
    scoring: str = "official"
    """One of SCORINGS: "official" (each benchmark's own script, as LLaVA runs it) or
    "lmms_eval" (lmms-eval 0.7.3's `process_results` and aggregations,
    `mllm_jax.eval.lmms_eval_scoring`)."""

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
    """Compute and KV-cache dtype, one of DTYPES (None: the checkpoint config's, float32).
    The parameters stay as stored: the model casts each weight at use."""
    param_dtype: str | None = None
    """Dtype the parameters are loaded in, one of DTYPES (None: as stored)."""
    mesh: str | None = None
    """Device mesh to decode on, "AXIS=SIZE,..." (e.g. data=-1); None: one device."""
    rules: str = "serving"
    """The parameter layout on `mesh`, one of RULES: "serving" (`sharding.SERVING_RULES`:
    split over tensor, replicated over data/fsdp, so no decode step gathers a weight) or
    "training" (`sharding.LOGICAL_RULES`)."""

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not self.ckpt and not self.copy_to:
            raise ValueError("mllm-jax eval needs --ckpt (or --copy-to to copy the data only)")
        _check(self.prompt_format.count("{}") == 1, "--prompt-format", self.prompt_format,
               "a text with one '{}'", "write '{}' where the question goes")
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
               f"one of {', '.join(DTYPES)}", "leave it unset to compute in float32")
        _check(self.param_dtype is None or self.param_dtype in DTYPES, "--param-dtype",
               self.param_dtype, f"one of {', '.join(DTYPES)}",
               "leave it unset to keep the stored dtype")
        _check(self.rules in RULES, "--rules", self.rules, f"one of {', '.join(RULES)}",
               "use serving unless you compare with the training layout")
        _check(all(self.stop or ()), "--stop", self.stop, "non-empty strings",
               "drop the empty stop string")
        _check(self.scoring in SCORINGS, "--scoring", self.scoring,
               f"one of {', '.join(SCORINGS)}", "official scores as the benchmarks' own "
               "scripts do, lmms_eval as lmms-eval 0.7.3 does")

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


def as_options(options) -> EvalOptions:
    if isinstance(options, EvalOptions):
        return options
    if isinstance(options, argparse.Namespace):
        raise TypeError("pass an EvalOptions, not an argparse Namespace: build it with "
                        "EvalOptions.from_args(args)")
    raise TypeError(f"expected an EvalOptions, got {type(options).__name__}")
