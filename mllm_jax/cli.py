"""The `mllm-jax` command: train, plan, generate, chat, eval, bench, convert, demo, presets."""
import argparse
import re
import sys

DTYPES = ("float32", "bfloat16", "float16")
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '1234' -> 1234 (as HF's max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


OVERWRITE_HELP = ("replace DST whole when it is not empty (the new checkpoint is written "
                  "beside it and swapped in once complete); without it a non-empty DST is "
                  "refused")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mllm-jax", description="Multimodal LLMs in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    convert = sub.add_parser("convert", help="convert checkpoints between HF and orbax")
    csub = convert.add_subparsers(dest="direction", metavar="DIRECTION")
    h2o = csub.add_parser("hf-to-orbax", help="HF checkpoint directory -> orbax checkpoint")
    h2o.add_argument("src", help="HF checkpoint directory (config.json + *.safetensors)")
    h2o.add_argument("dst", help="output directory")
    h2o.add_argument("--scan-layers", action="store_true",
                     help="store decoder/encoder layers stacked on a leading layer axis")
    h2o.add_argument("--dtype", choices=DTYPES, default=None,
                     help="parameter dtype (default: as stored in the checkpoint)")
    h2o.add_argument("--vision-tower", default=None, metavar="DIR",
                     help="the vision tower's checkpoint directory, for a LLaVA-repository "
                          "checkpoint whose mm_vision_tower is not a local directory")
    h2o.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    h2o.set_defaults(func=_hf_to_orbax)
    o2h = csub.add_parser("orbax-to-hf", help="orbax checkpoint -> HF checkpoint directory")
    o2h.add_argument("src", help="directory written by hf-to-orbax or save_orbax")
    o2h.add_argument("dst", help="output directory")
    o2h.add_argument("--dtype", choices=DTYPES, default=None,
                     help="tensor dtype to write (default: as stored)")
    o2h.add_argument("--max-shard-size", type=parse_size, default="5GB",
                     help="largest safetensors file before sharding (default 5GB)")
    o2h.add_argument("--layout", default=None, metavar="LAYOUT",
                     help="hf (the transformers class's layout) or llava_repo (the LLaVA "
                          "repository's); default: the layout the model was read from")
    o2h.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    o2h.set_defaults(func=_orbax_to_hf)
    convert.set_defaults(func=lambda args: _usage(convert))

    demo = sub.add_parser("demo", help="the whole recipe on the shapes world on a CPU: data, "
                                       "ViT and LM pre-training, stages 1-3 (DPO), evaluation "
                                       "after each stage, report.md and a plot (offline)")
    demo.add_argument("--workdir", default="mllm_jax_demo",
                      help="where the data, checkpoints, report.md and metrics.png go "
                           "(default ./mllm_jax_demo): a new or empty directory, or one an "
                           "earlier demo run used (its demo subdirectories are replaced)")
    demo.add_argument("--overwrite", action="store_true",
                      help="use --workdir even if it is not empty and no demo run created "
                           "it, replacing its data/, model/, ... subdirectories")
    demo.add_argument("--seed", type=int, default=0, help="seed of every phase (default 0)")
    demo.add_argument("--scale", default="default", choices=("default", "test"),
                      help="default: the full demo (about 10 minutes on 2 CPU cores); test: a "
                           "scaled-down run of every phase (about a minute)")
    demo.add_argument("--connector", default="mlp", choices=("mlp", "qformer"),
                      help="mlp: LLaVA's 2-layer MLP over the ViT's patch tokens, stages 1-3 "
                           "(default); qformer: BLIP-2's Q-Former (stage-1 pre-training with "
                           "ITC/ITM/ITG and held-out retrieval, then generative pre-training "
                           "and instruction tuning through the LLaVA stages 1-2)")
    demo.set_defaults(func=_demo)

    train = sub.add_parser(
        "train", help="train one stage from a config file (resumes from the workdir)",
        description="Overrides: --config.a.b=value for any field of the config.")
    train.add_argument("--config", required=True, help="a Python file defining get_config()")
    train.add_argument("--workdir", required=True,
                       help="checkpoints, TensorBoard scalars and the final parameters")
    train.set_defaults(func=_train)

    plan = sub.add_parser(
        "plan", help="compile a config's training step for a TPU topology on this machine "
        "(libtpu, no TPU needed): memory per chip, FLOPs, collectives, roofline",
        description="Overrides: --config.a.b=value for any field of the config. Prints a "
        "table, then one JSON line.")
    plan.add_argument("--config", required=True, help="a Python file defining get_config()")
    plan.add_argument("--topology", required=True,
                      help="a TPU topology, <chip>:<shape>: v5e:16x16, v5p:4x4x4, v6e:16x16")
    plan.add_argument("--decode", nargs=2, type=int, metavar=("BATCH", "LEN"), default=None,
                      help="also compile the generation programs (prefill and one decode "
                           "step) for BATCH sequences of LEN tokens with the serving rules")
    plan.add_argument("--no-train", action="store_true",
                      help="with --decode: the generation programs only")
    plan.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                      help="compute and KV-cache dtype of the generation programs")
    plan.add_argument("--dump-hlo", default="", metavar="DIR",
                      help="write each program's optimized HLO text into DIR")
    plan.set_defaults(func=_plan)

    for name, text in (("generate", "answer one prompt (with images) from a checkpoint"),
                       ("chat", "an interactive multi-turn chat with a checkpoint")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--ckpt", required=True, help="HF checkpoint directory with its "
                       "tokenizer (tokenizer.model or tokenizer.json)")
        p.add_argument("--template", default=None,
                       help="conversation template (default: the one the checkpoint records "
                            "in its tokenizer_config.json, else vicuna_v1)")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0,
                       help="0: greedy; otherwise sample at this temperature")
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", choices=DTYPES, default=None,
                       help="compute and KV-cache dtype (default: the checkpoint config's, "
                            "float32); the parameters stay as stored")
        if name == "generate":
            p.add_argument("--image", nargs="*", default=[], help="image file(s)")
            p.add_argument("--prompt", required=True)
        p.set_defaults(func=_generate if name == "generate" else _chat)

    bench = sub.add_parser("bench", help="benchmarks (one JSON line each)")
    bsub = bench.add_subparsers(dest="what", metavar="WHAT")
    btrain = bsub.add_parser("train", help="training step time, tokens/s and MFU, next to "
                                           "PyTorch/transformers")
    btrain.add_argument("--preset", default="llava-bench-small")
    btrain.add_argument("--stage", type=int, choices=(1, 2), default=2)
    btrain.add_argument("--batch", type=int, default=4)
    btrain.add_argument("--text-len", type=int, default=256)
    btrain.add_argument("--steps", type=int, default=5)
    btrain.add_argument("--dtype", choices=DTYPES, default="float32")
    btrain.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    btrain.add_argument("--packing", action="store_true",
                        help="instead: real tokens/s with and without data.packing on a "
                             "LLaVA-like mix (rows of the image's tokens + --text-len)")
    btrain.set_defaults(func=_bench_train)
    bdata = bsub.add_parser("data", help="samples/s of the LLaVA JSON pipeline (336 px, "
                                          "vicuna_v1), against a training step's rate, and "
                                          "its padding with and without packing")
    bdata.add_argument("--samples", type=int, default=64)
    bdata.add_argument("--batch", type=int, default=16)
    bdata.add_argument("--workers", type=int, default=2)
    bdata.add_argument("--tokenizer", default=None, help="a checkpoint directory with "
                       "tokenizer.model or tokenizer.json (default: one trained on the spot)")
    bdata.add_argument("--step-time", type=float, default=None,
                       help="seconds per training step (from bench train) to compare with")
    bdata.add_argument("--train-batch", type=int, default=4)
    bdata.set_defaults(func=_bench_data)
    bdecode = bsub.add_parser("decode", help="generation tokens/s at several batch sizes, "
                                             "next to transformers' generate")
    from mllm_jax.bench import decode as bench_decode
    bench_decode.add_arguments(bdecode)
    bdecode.set_defaults(func=bench_decode.main)
    bench.set_defaults(func=lambda args: _usage(bench))

    evaluate = sub.add_parser(
        "eval", help="score a checkpoint on benchmarks (POPE, VQAv2, GQA, MME, CHAIR, "
                     "ScienceQA, COCO captions) as their official scripts or lmms-eval do; "
                     "results in lmms-eval's layout")
    from mllm_jax.eval import runner as eval_runner
    eval_runner.add_arguments(evaluate)
    evaluate.set_defaults(
        func=lambda args: eval_runner.main(eval_runner.EvalOptions.from_args(args)))

    presets = sub.add_parser("presets", help="list model presets with parameter counts")
    presets.set_defaults(func=_presets)

    parser.set_defaults(func=lambda args: _usage(parser))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    from mllm_jax.train.config_file import split_config_args
    argv, overrides = split_config_args(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if overrides and args.command not in ("train", "plan"):
        parser.error(f"--config.* overrides apply to train and plan only: "
                     f"{' '.join(overrides)}")
    args.overrides = overrides
    from mllm_jax.convert import CheckpointMismatchError, UnsupportedModelError
    try:
        return args.func(args) or 0
    except (FileNotFoundError, FileExistsError, CheckpointMismatchError,
            UnsupportedModelError, KeyError, ValueError) as e:
        # Problems with the user's files: the message says what is wrong; no traceback.
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # no repr quotes
        print(f"mllm-jax {args.command}: error: {message}", file=sys.stderr)
        return 1


def _usage(parser):
    parser.print_help(sys.stderr)
    return 2


def _train(args):
    from mllm_jax.train import config_file
    from mllm_jax.train.loop import TrainingStopped, train
    cfg = config_file.load(args.config, args.overrides)
    try:
        summary = train(cfg, args.workdir)
    except TrainingStopped as e:
        print(f"mllm-jax train: {e}", file=sys.stderr)
        return 3
    if "stopped_at" in summary:
        print(f"stopped by signal {summary['signal']} after step {summary['stopped_at']}; "
              f"run the same command again to resume")
        return 0
    print(f"finished {summary['step']} steps; {summary['nan_skipped']} updates skipped; "
          f"final parameters in {args.workdir}/final")
    return 0


def _plan(args):
    import json
    import os
    # The plan compiles for a topology's abstract devices: no accelerator is used (or
    # started) on this machine.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from mllm_jax.plan import train_plan
    from mllm_jax.train import config_file
    cfg = config_file.load(args.config, args.overrides)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.no_train and not args.decode:
        raise ValueError("--no-train leaves nothing to plan without --decode BATCH LEN")
    plans = [] if args.no_train else [
        train_plan.plan_training(cfg, args.topology, dump_hlo=args.dump_hlo, log=log)]
    if args.decode:
        from mllm_jax.plan import decode_plan
        plans.extend(decode_plan.plan_decode(cfg, args.topology, *args.decode,
                                             dtype=args.dtype, dump_hlo=args.dump_hlo,
                                             log=log))
    for p in plans:
        print(train_plan.table(p))
    for p in plans:
        print(json.dumps(p))
    return 0


def _bench_train(args):
    import json
    if args.packing:
        from mllm_jax.bench import train_packing
        print(json.dumps(train_packing.run(args.preset, args.stage, args.batch, args.text_len,
                                           args.steps, dtype=args.dtype)))
        return 0
    from mllm_jax.bench import train as bench_train
    out = bench_train.run(args.preset, args.stage, args.batch, args.text_len, args.steps,
                          torch_compare=not args.no_torch, dtype=args.dtype)
    print(json.dumps(out))
    return 0


def _session(args):
    import jax
    from mllm_jax.convert import load_hf
    from mllm_jax.infer.generate import with_compute_dtype
    from mllm_jax.infer.prompting import Session
    model, params = load_hf(args.ckpt, check_finite=True)
    model = with_compute_dtype(model, args.dtype)
    sampling = {}
    if args.temperature > 0:
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, rng=jax.random.PRNGKey(args.seed))
    return Session(model, params, args.ckpt, args.template,
                   max_new_tokens=args.max_new_tokens, **sampling)


def _generate(args):
    print(_session(args).ask(args.prompt, args.image))
    return 0


def _chat(args):
    session = _session(args)
    print("Type a message; '/image PATH' attaches an image to the next message; an empty "
          "line or end of input quits.")
    images = []
    for line in sys.stdin:
        line = line.strip()
        if not line:
            break
        if line.startswith("/image "):
            images.append(line[len("/image "):].strip())
            continue
        print(session.ask(line, images), flush=True)
        images = []
    return 0


def _bench_data(args):
    import json
    from mllm_jax.bench import data as bench_data
    print(json.dumps(bench_data.run(args.samples, args.batch, args.workers,
                                    tokenizer=args.tokenizer, step_time=args.step_time,
                                    train_batch=args.train_batch)))
    return 0


def _check_destination(args):
    from mllm_jax.convert import destination
    if args.overwrite:
        destination.require_outside(args.src, args.dst)
    else:
        destination.require_empty(args.dst)


def _hf_to_orbax(args):
    from mllm_jax.convert import destination, load_hf, save_orbax
    _check_destination(args)
    model, params = load_hf(args.src, dtype=args.dtype, scan_layers=args.scan_layers,
                            vision_tower=args.vision_tower)
    from mllm_jax.infer.chat_template import copy_chat_template
    with destination.staged(args.dst, replace=True) as work:
        save_orbax(model, params, work)
        copy_chat_template(args.src, work)  # the template the model was trained with
    print(f"wrote {args.dst} ({model.cfg.model_type}, {_count(params):,} parameters, "
          f"dtype {model.cfg.param_dtype}, scan_layers={model.cfg.scan_layers})")
    return 0


def _orbax_to_hf(args):
    from mllm_jax.convert import load_orbax, save_hf
    _check_destination(args)
    model, params = load_orbax(args.src)
    save_hf(model, params, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, layout=args.layout)
    from mllm_jax.infer.chat_template import copy_chat_template
    copy_chat_template(args.src, args.dst)
    print(f"wrote {args.dst} ({model.cfg.model_type}, {_count(params):,} parameters)")
    return 0


def _count(tree):
    import jax
    import numpy as np
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def _presets(args):
    from mllm_jax import presets
    from mllm_jax.convert import abstract_params
    from mllm_jax.models import build_model
    names = presets.names()
    width = max(len(n) for n in names)
    print(f"{'preset':<{width}}  {'model_type':<11}  {'parameters':>15}")
    for name in names:
        cfg = presets.get(name)
        cfg.scan_layers = True  # same count, traced once per stack instead of per layer
        count = _count(abstract_params(build_model(cfg)))  # eval_shape: nothing allocated
        print(f"{name:<{width}}  {cfg.model_type:<11}  {count:>15,}")
    return 0


def _demo(args):
    from mllm_jax import demo
    from mllm_jax.demo.report import table
    result = demo.run(workdir=args.workdir, scale=args.scale, seed=args.seed,
                      overwrite=args.overwrite, connector=args.connector)
    print(f"mllm-jax demo (scale {args.scale}, seed {result['settings'].seed}"
          f"{', connector qformer' if args.connector == 'qformer' else ''}): metrics on "
          f"the held-out split after each stage")
    q = result.get("pretrain", {}).get("qformer", {})
    if "i2t_r1" in q:
        print(f"Q-Former stage 1: held-out image-to-text R@1 {q['i2t_r1']:.3f} (chance "
              f"{q['chance']:.3f})")
    print(table(result["metrics"]))
    print(f"wall time {result['total']:.0f}s; report: {result['paths']['report']}")
    print(f"plot: {result['paths']['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
