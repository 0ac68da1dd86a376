"""The training data source a config names (`data.source`): synthetic batches, a
LLaVA-format JSON file with its images, a prepared TFDS directory, or a weighted mixture.
Every source is an iterator of host batches with `get_state` / `set_state` (saved in the
training checkpoints) and a `seq_len`.
"""
from mllm_jax.models import registry
from mllm_jax.train.objectives import make_objective


def make_data(cfg, process_index, process_count, workdir=None, objective=None):
    """This process's batch iterator (with get_state/set_state) for `cfg.data.source`:
    `synthetic` (deterministic random batches), `llava_json` (a LLaVA-format JSON file and an
    image folder, through `data.pipeline.LlavaPipeline`) or `tfds` (a prepared
    `data.tfds_builders` dataset directory, `data.tfds_dir`, images read from memory).

    With an objective whose `data_mode` is "dpo" (stage.objective "dpo") the JSON file (or
    TFDS dataset) holds preference pairs {id, image, prompt, chosen, rejected} and the
    pipeline yields the DPO batch keys; with "image_text" (stage.objective "blip2_stage1")
    it holds image-caption pairs (LLaVA records with one caption turn, or {id, image,
    caption} entries; see `data.pairs`), data.tokenizer is the Q-Former's tokenizer and
    data.max_length the caption length. `objective` defaults to the one the config names.
    A non-empty `data.mixture` ([{"json" or "tfds_dir", "image_root", "weight"}, ...]) mixes
    several such sources with `data.pipeline.MixturePipeline` (seeded by data.seed).
    `data.packing` packs several whole samples into each row of one source's batches
    (`data.packing`; lm and dpo objectives, not mixtures)."""
    d = cfg.data
    if objective is None:
        objective = make_objective(cfg.stage, cfg.train.loss_chunk)
    if d.source == "synthetic":
        from mllm_jax.data.synthetic import SyntheticSource
        if d.get("packing", False):
            raise ValueError("data.packing = True with data.source=synthetic: packing fills "
                             "rows with tokenized samples of data.source llava_json or tfds; "
                             "set data.packing=False")
        return SyntheticSource(cfg.model, cfg.train.global_batch_size, d.text_len,
                               seed=d.seed, images_per_sample=d.images,
                               objective=objective.data_mode,
                               nan_batches=tuple(d.get("nan_batches") or ()),
                               distinct_batches=d.get("distinct_batches", 0),
                               process_index=process_index, process_count=process_count)
    if d.source in ("llava_json", "tfds"):
        return _llava_json_pipeline(cfg, process_index, process_count, workdir,
                                    objective.data_mode)
    raise ValueError(f"unknown data.source {d.source!r} (available: synthetic, llava_json, "
                     f"tfds)")


def _records(source, spec, mode, allow_absolute=False):
    """The records of one data source: spec has "json" (+ "image_root") or "tfds_dir".
    Image paths are confined to the image root (the JSON file's directory when empty), see
    `data.paths`; `allow_absolute` (data.allow_absolute_image_paths, or the spec's own
    "allow_absolute_image_paths") reads absolute paths wherever they are."""
    if source == "tfds" or spec.get("tfds_dir"):
        from mllm_jax.data.tfds_builders import PreferenceRecord, records_from_tfds
        if not spec.get("tfds_dir"):
            raise ValueError("data.source=tfds needs data.tfds_dir (a prepared dataset "
                             "directory)")
        records = list(records_from_tfds(spec["tfds_dir"]))
        prefs = sum(isinstance(r, PreferenceRecord) for r in records)
        if records and (mode == "dpo") != (prefs == len(records)):
            raise ValueError(f"{spec['tfds_dir']}: an objective reading {mode} batches needs "
                             f"{'preference' if mode == 'dpo' else 'conversation'} "
                             f"records")
        return records
    if not spec.get("json"):
        raise ValueError(f"data.source={source} needs data.json (a path)")
    from mllm_jax.data.llava_json import read_llava_json, read_preference_json
    from mllm_jax.data.pairs import read_caption_records
    read = {"dpo": read_preference_json,
            "image_text": read_caption_records}.get(mode, read_llava_json)
    allow = bool(spec.get("allow_absolute_image_paths", allow_absolute))
    return read(spec["json"], spec.get("image_root") or None,
                allow_absolute_image_paths=allow)


def _llava_json_pipeline(cfg, process_index, process_count, workdir, mode):
    from mllm_jax.data import image as image_lib
    from mllm_jax.data.pipeline import LlavaPipeline, MixturePipeline
    from mllm_jax.data.tokenizer import load_tokenizer
    d, m = cfg.data, cfg.model
    if mode not in ("lm", "dpo", "image_text"):
        raise ValueError(f"data.source={d.source} feeds objectives that read lm, dpo or "
                         f"image_text batches, not {mode!r} (stage.objective "
                         f"{cfg.stage.objective!r})")
    if d.images and not registry.is_multimodal(m):
        raise ValueError(f"data.images={d.images} but model_type {m.model_type!r} takes no "
                         "images; set data.images=0")
    if not d.get("tokenizer"):
        raise ValueError(f"data.source={d.source} needs data.tokenizer (a path)")
    own = registry.image_config(m, d.processor) if d.get("processor") and d.images else None
    if own is not None:  # the family reads its processor's config itself (Qwen2-VL)
        image_cfg = own
    elif d.get("processor"):
        image_cfg = image_lib.load_image_processor_config(d.processor,
                                                          mode=d.get("image_mode") or None)
    elif d.images:  # the model's own resolution with CLIP's mean/std
        size = m.vision.image_size
        image_cfg = image_lib.ImageProcessorConfig(
            mode=d.get("image_mode") or "crop", size={"shortest_edge": size}, crop_size=size)
    else:
        image_cfg = None
    tokens = registry.tokens_per_image(m) if d.images else 0
    # A family whose image token counts depend on the image (LLaVA-NeXT) encodes its own.
    image_inputs = registry.image_inputs(m, image_cfg) if d.images else None
    tokenizer = load_tokenizer(d.tokenizer)
    # InstructBLIP: each sample's instruction for the Q-Former (registry.sample_inputs).
    inputs = registry.sample_inputs(m, d) if mode != "image_text" else None
    mixture = [dict(s) for s in (d.get("mixture") or [])]
    allow_absolute = bool(d.get("allow_absolute_image_paths", False))

    def pipeline(records, seed, **kw):
        return LlavaPipeline(
            records, tokenizer, image_cfg, d.get("template") or "vicuna_v1",
            max_length=d.max_length, max_images=d.images,
            image_tokens_per_image=tokens, image_token_id=registry.image_token_id(m),
            seed=seed, process_index=process_index, process_count=process_count,
            num_workers=d.workers, workdir=workdir, mode=mode, sample_inputs=inputs,
            packing=bool(d.get("packing", False)),
            packing_images=int(d.get("packing_images", 0)),
            image_placement=d.get("image_placement") or None,
            image_inputs=image_inputs, image_text=registry.image_text(m), **kw)

    seed = d.seed
    if mixture and d.get("packing", False):
        raise ValueError("data.packing = True with a data.mixture: mixtures are not packed; "
                         "set data.packing=False or train on one source")
    if mixture:
        # Each source its own order (seed + k) and report file (data_report.source{k}.*).
        sources = [(pipeline(_records(d.source, spec, mode, allow_absolute), seed + k,
                             report_name=f"data_report.source{k}"),
                    float(spec.get("weight", 1.0))) for k, spec in enumerate(mixture)]
        pipe = MixturePipeline(sources, global_batch_size=cfg.train.global_batch_size,
                               seed=seed)
    else:
        spec = {"json": d.get("json"), "image_root": d.get("image_root"),
                "tfds_dir": d.get("tfds_dir") if d.source == "tfds" else ""}
        pipe = pipeline(_records(d.source, spec, mode, allow_absolute), seed,
                        global_batch_size=cfg.train.global_batch_size)
    pipe.seq_len = d.max_length
    return pipe
