"""`mllm-jax plan`: a config's training step compiled ahead of time for a TPU topology on
any machine (libtpu installed, no TPU attached), and what the compiled program says about
it: memory per chip against HBM, FLOPs per chip counted from the optimized HLO (loops
weighted by their trip counts, `plan.hlo`), collective bytes per chip by kind, and a
roofline: the step's compute time at the chip's peak and the ICI floor (the time the
chip needs at least to send its collectives' bytes, `plan.chips`).
"""
import collections
import os
import time

import jax

from mllm_jax.plan import hlo
from mllm_jax.plan.chips import chip_for


def topology_devices(topology: str):
    """The abstract devices of a TPU topology ("v5e:16x16"); a clear error without libtpu."""
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("compiling for a TPU topology needs libtpu: pip install "
                           f"'jax[tpu]=={jax.__version__}' (or this package's `tpu` extra)")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata look-up
    # Compiling takes no chip: several processes may plan at once (libtpu otherwise
    # allows one process per machine).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(topology, "tpu").devices
    except Exception as e:  # libtpu's message names what it could not parse
        raise ValueError(f"topology {topology!r}: {e}; name it as <chip>:<shape>, e.g. "
                         "v5e:16x16, v5p:4x4x4, v6e:16x16") from e


def global_batch_shapes(cfg) -> dict:
    """ShapeDtypeStructs of one global batch of the config: the keys, dtypes and lengths
    its data source yields (a synthetic batch of the same shapes stands for any source)."""
    from mllm_jax.data.synthetic import SyntheticSource
    from mllm_jax.models import registry
    from mllm_jax.train.objectives import make_objective
    d = cfg.data
    mode = make_objective(cfg.stage, cfg.train.loss_chunk).data_mode
    images = d.images if registry.is_multimodal(cfg.model) else 0
    text_len = d.text_len
    if d.source != "synthetic":  # the pipelines pad every row to data.max_length
        tokens = registry.tokens_per_image(cfg.model) if images else 0
        text_len = d.max_length if mode == "image_text" else d.max_length - 1 - images * tokens
    one = SyntheticSource(cfg.model, 1, text_len, images_per_sample=images or 1,
                          objective=mode).global_batch(0)
    b = cfg.train.global_batch_size
    return {k: jax.ShapeDtypeStruct((b,) + v.shape[1:], v.dtype) for k, v in one.items()}


def summarize(compiled, num_devices: int, chip, model_flops_per_device: float) -> dict:
    """The plan's figures from a compiled program (see the module docstring)."""
    mem = compiled.memory_analysis()
    program = hlo.Program(compiled.as_text(), num_devices)
    flops = program.flops()
    by_kind, wire, top = collections.defaultdict(float), 0.0, []
    for c in program.collectives():
        by_kind[c.kind] += c.bytes * c.count
        wire += c.wire_bytes * c.count
        top.append((c.bytes * c.count, c))
    memory = (mem.argument_size_in_bytes + mem.output_size_in_bytes
              - mem.alias_size_in_bytes + mem.temp_size_in_bytes
              + mem.generated_code_size_in_bytes)
    compute_s = flops / chip.bf16_flops
    ici_s = wire / chip.ici_bytes_per_s
    top.sort(key=lambda t: -t[0])
    return {
        "memory_bytes_per_device": int(memory),
        "memory_detail": {"arguments": int(mem.argument_size_in_bytes),
                          "outputs": int(mem.output_size_in_bytes),
                          "aliased": int(mem.alias_size_in_bytes),
                          "temporaries": int(mem.temp_size_in_bytes),
                          "code": int(mem.generated_code_size_in_bytes)},
        "hbm_bytes_per_device": int(chip.hbm_bytes),
        "memory_fraction": round(memory / chip.hbm_bytes, 4),
        "flops_per_device": flops,
        "recomputed_flops_per_device": program.recomputed_flops,
        "model_flops_per_device": model_flops_per_device,
        # What the model count counts: the compiled FLOPs without rematerialization.
        "flops_ratio": round((flops - program.recomputed_flops) / model_flops_per_device, 4)
        if model_flops_per_device else None,
        "collective_bytes_per_device": {k: int(v) for k, v in sorted(by_kind.items())},
        "collective_wire_bytes_per_device": int(wire),
        "compute_s_at_peak": compute_s,
        "ici_floor_s": ici_s,
        "ici_over_compute": round(ici_s / compute_s, 4) if compute_s else None,
        "largest_collectives": [
            {"kind": c.kind, "bytes": int(c.bytes), "times": c.count, "group": c.group,
             "op": c.op_name[-120:]} for _, c in top[:5]],
        "unknown_trip_counts": program.unknown_trip_counts,
        "uncounted_kernels": program.uncounted_kernels,
    }


def plan_training(cfg, topology: str, *, dump_hlo: str = "", log=print) -> dict:
    """Compiles `cfg`'s training step for `topology` and returns the plan (a dict)."""
    from mllm_jax.models import registry
    from mllm_jax.train import flops as flops_lib, validate
    from mllm_jax.train.loop import build_trainer
    validate.check(cfg)
    devices = topology_devices(topology)
    validate.check_devices(cfg, len(devices))
    chip = chip_for(topology, devices[0].device_kind)
    batch = global_batch_shapes(cfg)
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, devices=devices, abstract=True)
    lowered = trainer.jit_step(batch).lower(trainer.state, trainer.frozen,
                                            trainer.frozen_extra, trainer.abstract_batch(batch))
    log(f"plan: lowered for {topology} ({len(devices)} chips, mesh "
        f"{dict(trainer.mesh.shape)}); compiling")
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        with open(os.path.join(dump_hlo, "train_step.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
    seq = batch["input_ids"].shape[1] if "input_ids" in batch else \
        batch["chosen_input_ids"].shape[1]
    images = cfg.data.images if registry.is_multimodal(cfg.model) else 0
    model_flops = flops_lib.train_step_flops(cfg.model, cfg.train.global_batch_size, seq,
                                             images, trainer.state.params)
    out = {"program": "train_step", "compiles": True, "topology": topology,
           "chip": chip.name, "devices": len(devices),
           "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
           "global_batch": cfg.train.global_batch_size, "seq_len": seq,
           "compile_s": round(compile_s, 1)}
    out.update(summarize(compiled, len(devices), chip, model_flops / len(devices)))
    return out


def table(plan: dict) -> str:
    """The plan as a few aligned lines for people."""
    gib = 2 ** 30
    m = plan["memory_detail"]
    rows = [
        ("program", f"{plan['program']} on {plan['topology']} ({plan['devices']} x "
                    f"{plan['chip']}), mesh " + " ".join(f"{k}={v}" for k, v in
                                                         plan["mesh"].items())),
        ("compile", f"{plan['compile_s']} s"),
        ("memory per chip", f"{plan['memory_bytes_per_device'] / gib:.2f} GiB of "
                            f"{plan['hbm_bytes_per_device'] / gib:.2f} GiB HBM "
                            f"({100 * plan['memory_fraction']:.1f}%): arguments "
                            f"{m['arguments'] / gib:.2f}, outputs {m['outputs'] / gib:.2f} "
                            f"(aliased {m['aliased'] / gib:.2f}), temporaries "
                            f"{m['temporaries'] / gib:.2f}, code {m['code'] / gib:.3f}"),
        ("FLOPs per chip", f"{plan['flops_per_device']:.4g} from the HLO ("
         f"{plan['recomputed_flops_per_device']:.3g} recomputed)"
         + (f", {plan['model_flops_per_device']:.4g} model count (ratio without "
            f"recomputation {plan['flops_ratio']})" if plan["model_flops_per_device"] else "")),
        ("collectives per chip", ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in
                                           plan["collective_bytes_per_device"].items())
         or "none"),
        ("compute at peak", f"{plan['compute_s_at_peak'] * 1e3:.4g} ms"),
        ("ICI floor", f"{plan['ici_floor_s'] * 1e3:.4g} ms "
                      f"({plan['ici_over_compute']} x compute)"),
    ]
    if "kv_cache_bytes_per_device" in plan:
        rows.append(("KV cache per chip", f"{plan['kv_cache_bytes_per_device'] / gib:.2f} GiB "
                     f"{plan['kv_cache_dtype']} (donated: {plan['cache_donated']}); weights "
                     f"{plan['weight_bytes_per_device'] / gib:.2f} GiB; HBM floor "
                     f"{plan['hbm_floor_s'] * 1e3:.4g} ms"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


