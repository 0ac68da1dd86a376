"""Registries of model parts: encoders, connectors, decoders, and the composed models.

A family is a module plus a registration. The registration says everything the rest of the
package needs to know about it: how to build it from a config, its default config, how its
config maps from and to HF's `config.json`, how its checkpoint keys are spelled, how many
tokens an image becomes, and how many FLOPs it costs. Nothing outside a family's own module
tests its name; code asks the registry (`tokens_per_image(cfg)`, `is_multimodal(cfg)`, ...).

    registry.register_encoder("patch_mean", EncoderSpec(module=..., config=..., ...))
    cfg.vision.type = "patch_mean"; model = registry.build_model(cfg)

Fields that select a part: `model_type` (composed model), `vision.type` (encoder),
`projector.type` (connector), `text.model_type` (decoder). Another program's checkpoint
layout for a family (`CheckpointLayout`, `register_layout`) reads its checkpoints into the
family's config and parameters and writes them back; `checkpoint_layout.name` records it.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Optional

import ml_collections


class UnsupportedModelError(ValueError):
    """A config (ours or HF's) names a model, part or setting that is not available."""


class InvalidConfigError(ValueError):
    """A config value (ours or HF's) that no model can be built from: a count that is not a
    positive integer, heads that do not divide a width, a layer count past the sane bound.
    The message names where the config came from, the field and the value."""


class Registry:
    """Named entries of one kind; `field` is the config field that selects one."""

    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry, *, replace: bool = False):
        if not replace and name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True "
                             "to replace it")
        self._entries[name] = entry
        return entry

    def get(self, name: str):
        if name not in self._entries:
            near = difflib.get_close_matches(str(name), self.names(), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UnsupportedModelError(
                f"unknown {self.kind} {name!r} ({self.field}){hint} Registered: "
                f"{', '.join(self.names())}. A new one is registered with "
                f"mllm_jax.models.registry.register_{self.kind}.")
        return self._entries[name]

    def __contains__(self, name) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self):
        return sorted(self._entries.items())


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """A modality encoder. `module(cfg)` (cfg: the composed model config, the encoder's own
    fields under `cfg.vision`) is a Linen module mapping NHWC pixels [n, h, w, c] to features
    [n, tokens, d]. Its config must have `type`, `image_size` and `num_channels`."""

    module: Callable[[Any], Any]
    config: Callable[..., ml_collections.ConfigDict]
    tokens_per_image: Callable[[Any], int]  # (composed cfg) -> features per image
    flops: Optional[Callable[[Any], float]] = None  # (composed cfg) -> forward FLOPs / image
    feature_size: Optional[Callable[[Any], int]] = None  # (composed cfg) -> d of features
    from_hf: Optional[Callable[..., ml_collections.ConfigDict]] = None  # (hf dict, where)
    to_hf: Optional[Callable[[Any], dict]] = None  # (vision cfg) -> HF vision_config
    # (vision cfg or a dict of its fields, where) -> None; raises InvalidConfigError naming
    # `where`, the field and the value (see `models.checks`).
    check: Optional[Callable[[Any, str], None]] = None
    # () -> the HF `vision_config` model_type values `from_hf` reads in a composed model's
    # config (`encoder_for_hf`); empty: none.
    hf_model_types: Callable[[], tuple] = tuple


@dataclasses.dataclass(frozen=True)
class ConnectorSpec:
    """A connector from encoder features to the LLM's embeddings. `module(cfg)` maps
    [n, tokens_in, d_enc] to [n, tokens_out, d_llm]."""

    module: Callable[[Any], Any]
    config: Callable[..., ml_collections.ConfigDict]
    tokens_out: Callable[[Any, int], int] = lambda cfg, tokens_in: tokens_in
    # (cfg, tokens_in, feature size in) -> forward FLOPs per image
    flops: Optional[Callable[[Any, int, int], float]] = None
    # As `ModelFamily.sample_inputs` / `sample_input_keys`, for a connector that reads more
    # than the image features (an instruction-aware Q-Former); composed families ask it.
    sample_inputs: Optional[Callable[[Any, Any], Any]] = None
    sample_input_keys: Callable[[Any], tuple] = lambda cfg: ()


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """A decoder-only LLM stack. `module(text_cfg, dtype, param_dtype, scan_layers,
    remat_policy, attention)` (attention: the `model.attention` setting, see
    `models.splash`) has `embed(ids)`, `embedding_table()` and `attend(h)` (the input
    embedding and the tied output head) and `__call__(embeds, attention_mask, segment_ids,
    position_ids, *, cache=None, kv_mask=None, prefill=False)`; `init_cache(text_cfg, batch,
    max_len, dtype, scan_layers)` is its empty KV cache."""

    module: Callable[..., Any]
    config: Callable[..., ml_collections.ConfigDict]
    init_cache: Callable[..., dict]
    reorder_cache: Callable[..., dict]  # (cache, rows, scan_layers): batch rows gathered
    flops: Optional[Callable[[Any, int], float]] = None  # (text cfg, seq) -> forward FLOPs
    # The part of `flops` in attention's scores and weighted values (no weights: its
    # backward is twice its forward whenever a gradient passes through it).
    attention_flops: Optional[Callable[[Any, int], float]] = None
    from_hf: Optional[Callable[..., ml_collections.ConfigDict]] = None
    to_hf: Optional[Callable[[Any], dict]] = None
    # (text cfg or a dict of its fields, where) -> None; raises InvalidConfigError.
    check: Optional[Callable[[Any, str], None]] = None
    # (composed cfg) -> the language-model module composed models put under
    # `language_model`; None: `CausalLM(cfg)` over `module`. An encoder-decoder LM (T5) gives
    # its own, with CausalLM's methods (`embed`, `__call__(input_ids, pixel_values,
    # attention_mask, *, inputs_embeds, ...)`, `init_cache`, `reorder_cache`, `prefill(...,
    # inputs_embeds=)`, `decode_step`) and `decoder_input_ids` / `decoder_attention_mask`.
    language_model: Optional[Callable[[Any], Any]] = None
    # Positions are rows of a learned table (OPT): a sequence may not run past
    # `max_position_embeddings`, generated tokens included.
    learned_positions: bool = False
    # (text cfg, prefix) -> regexes of checkpoint keys under `prefix` (e.g.
    # "language_model.") that the language model reads past (stored copies of tied tensors);
    # composed families add them to their own `unused_keys`.
    unused_keys: Optional[Callable[[Any, str], list]] = None


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A composed model. `module(cfg)` is the Linen module `build_model` returns."""

    module: Callable[[Any], Any]
    config: Callable[..., ml_collections.ConfigDict]
    init_inputs: Callable[[Any], tuple]  # (cfg) -> positional arguments for module.init
    # (cfg, image_size (h, w) or None) -> image tokens per image; None: the model takes no
    # images with its text. `image_size` is what the family's input for one image follows:
    # the pixels given to a fixed-resolution tower (LLaVA: its processor sets them), or the
    # original image for families whose inputs keep its size (LLaVA-NeXT's `image_sizes`,
    # Qwen2-VL's grid after smart_resize). None: the configured resolution.
    tokens_per_image: Optional[Callable[[Any], int]] = None
    # (cfg) -> the token id whose positions receive image features.
    image_token_id: Callable[[Any], Optional[int]] = lambda cfg: cfg.get("image_token_index")
    generates: bool = True  # has init_cache / prefill / decode_step
    # () -> the HF config.json model_type values whose checkpoints this family reads.
    hf_model_types: Callable[[], tuple] = tuple
    from_hf: Optional[Callable[..., ml_collections.ConfigDict]] = None  # (hf dict, where)
    to_hf: Optional[Callable[[Any], dict]] = None
    # Checkpoint key spellings other than the canonical one: [(regex, replacement), ...].
    key_aliases: tuple = ()
    # (cfg) -> regexes of checkpoint keys that the model does not use (skipped on load).
    unused_keys: Callable[[Any], list] = lambda cfg: []
    # (cfg, batch, seq, images_per_sample, trainable parameter tree) -> model FLOPs per
    # training step (matmuls, 2 per multiply-add; see `train.flops`).
    train_flops: Optional[Callable[..., float]] = None
    # (cfg, where) -> None: checks the composed config, its parts through their own `check`;
    # raises InvalidConfigError. `from_hf` should check the HF values before building.
    check: Optional[Callable[[Any, str], None]] = None
    # (cfg, checkpoint directory) -> the family's own prompt encoder, for models whose HF
    # processor builds the inputs instead of a conversation template (BLIP-2: image tokens
    # before the tokenized text; InstructBLIP: also the Q-Former's tokens). It has
    # `encode(conversation) -> (input ids, extra)` and `batch(extras) -> {keyword: array}`
    # (the extra model inputs of a batch of prompts); see `infer.batching`. None: templates.
    prompt_encoder: Optional[Callable[[Any, str], Any]] = None
    # (cfg, data cfg) -> the builder of the per-sample model inputs that training batches
    # carry besides the conversation (InstructBLIP: each sample's instruction for its
    # Q-Former); None when this model needs none. The builder has `keys` (the batch keys,
    # keyword arguments of the model's `hidden_states`), `encode(messages, sample_id)` (one
    # sample's arrays, from its LLaVA-format messages), `collate(encoded, batch_size)` and
    # `synthetic(rng, batch_size)` (random inputs for synthetic batches).
    sample_inputs: Optional[Callable[[Any, Any], Any]] = None
    # (cfg) -> the builder's `keys` without building it: what the training objectives pass
    # from a batch to the model, and require.
    sample_input_keys: Callable[[Any], tuple] = lambda cfg: ()
    # (cfg, input ids, pixel_values, model inputs) -> (pixel_values, model inputs): checks
    # concrete image inputs against the prompts and brings them to the shapes generation
    # compiles for (Qwen2-VL: flattened patches padded to a bucket, `image_grid_thw` per
    # image). None: NHWC images of `tokens_per_image` tokens each, model inputs batch-first.
    prepare_image_inputs: Optional[Callable[..., tuple]] = None
    # (cfg, image processor config or None) -> how the family's images become model inputs
    # outside the model, when not one fixed-shape NHWC array of `tokens_per_image(cfg)`
    # tokens each (`data.image_inputs.FixedImages`, the default). The object has
    #   sized: bool -- whether an image's token count depends on its size; prompts are then
    #     tokenized from the images' (height, width) (upright, read from their headers),
    #     before any image is decoded;
    #   tokens(size) -> int -- image tokens of an image of `size` (height, width) as the
    #     processor sees it (None when not `sized`): the count `build_prompt` expands its
    #     placeholder to (`image_tokens_per_image` takes one count per image);
    #   encode(image) -> the image's encoding: from a decoded PIL image, any value `batch`
    #     reads (LLaVA-NeXT: its anyres views and its `image_sizes`; Qwen2-VL could give its
    #     flattened patches and `image_grid_thw` row);
    #   batch(encodings) -> {model keyword: array}: a batch's images, in the order of their
    #     tokens in the flattened batch, stacked with static shapes (LLaVA-NeXT: views
    #     padded to the most the pinpoints give), e.g. {"pixel_values", "image_sizes"};
    #     {} for no images.
    # and, for training batches (`data.pipeline`, a `sized` family):
    #   tokens_of(encoding) -> int -- the image tokens of an encoded image;
    #   collate(rows, batch_size, max_images) -> {batch key: array}: each row's encodings in
    #     the training layout [batch, max_images, ...], a row's images first; the slots after
    #     them hold inputs the model reads past (its image tokens come first).
    # Generation, chat and eval (`infer.batching`) ask it; None: `FixedImages`.
    image_inputs: Optional[Callable[[Any, Any], Any]] = None
    # (cfg) -> the model keywords besides `pixel_values` that a training batch's images come
    # with (LLaVA-NeXT: `image_sizes`; Qwen2-VL: `image_grid_thw`); the training objectives
    # pass them from the batch when it has them.
    image_input_keys: Callable[[Any], tuple] = lambda cfg: ()
    # (cfg, checkpoint directory) -> the image processor config the checkpoint holds, in
    # the form the family's `image_inputs` takes, when the family reads its own (Qwen2-VL:
    # pixel bounds, which `data.image.ImageProcessorConfig` has no field for); None: the
    # directory holds none. Without the hook: `data.image.load_image_processor_config`.
    image_config: Optional[Callable[[Any, str], Any]] = None
    # (cfg) -> the text a prompt writes for one image around the "<image>" placeholder
    # (Qwen2-VL: "<|vision_start|><image><|vision_end|>", as its processor's chat template
    # writes it); None: the placeholder alone. Prompts and training examples both use it.
    image_text: Optional[Callable[[Any], str]] = None


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    """How another program stores a family's models: its config.json, its tensor names and
    stored shapes, read into the family's own config and parameters and written back from
    them. A config read through a layout records it (`cfg.checkpoint_layout.name`), so
    `save_hf` writes that layout again by default; the family's HF layout stays available.

    Names are spoken of in two spellings: *stored* (the checkpoint's) and *canonical* (the
    HF class's on-disk names, which our parameter paths translate to, `convert.hf_keys`)."""

    family: str  # the MODELS entry whose module the checkpoints load into
    hf_model_types: Callable[[], tuple]  # () -> config.json model_type values it reads
    # (hf dict, where, directory=None, **options) -> our config (the family's), recording
    # the layout; options are load_hf's (e.g. vision_tower=). Checks the values it maps.
    from_hf: Callable[..., ml_collections.ConfigDict]
    to_hf: Callable[[Any], dict]  # (cfg) -> the config.json dict to write
    # (config.json dict) -> whether this layout reads it; None: by model_type alone.
    reads: Optional[Callable[[dict], bool]] = None
    canonical_key: Callable[[Any, str], str] = lambda cfg, key: key
    # (cfg, canonical key) -> the stored key, or None for a tensor this layout does not write
    stored_key: Callable[[Any, str], Optional[str]] = lambda cfg, key: key
    # (cfg, canonical key, canonical shape) -> the stored shape
    stored_shape: Callable[[Any, str, tuple], tuple] = lambda cfg, key, shape: tuple(shape)
    # (cfg, canonical key, array) -> array: stored -> canonical, and back
    from_stored: Callable[[Any, str, Any], Any] = lambda cfg, key, array: array
    to_stored: Callable[[Any, str, Any], Any] = lambda cfg, key, array: array
    # (cfg, directory) -> the tensors to read (`keys`, `shape`, `dtype`, `get`, `file_of`,
    # `directory`, as `convert.safetensors_io.CheckpointReader`); None: that reader.
    open_reader: Optional[Callable[[Any, str], Any]] = None
    # (cfg) -> the prompt text of one image, around the "<image>" placeholder (e.g.
    # "<im_start><image><im_end>" for a model trained so); None: the placeholder alone.
    image_text: Optional[Callable[[Any], str]] = None


ENCODERS = Registry("encoder", "vision.type")
CONNECTORS = Registry("connector", "projector.type")
DECODERS = Registry("decoder", "text.model_type")
MODELS = Registry("model", "model_type")
LAYOUTS = Registry("layout", "checkpoint_layout.name")
HF_LAYOUT = "hf"  # a family's own HF layout (`ModelFamily.from_hf` / `to_hf`), not registered


def decoder_train_flops(text_cfg, seq: int, batch: int, upstream: bool, trained: bool) -> float:
    """A decoder's FLOPs in a training step: its forward, plus the activation gradients when
    anything upstream of it is trained, plus its weight gradients when it is trained; the
    attention scores and weighted values (`DecoderSpec.attention_flops`) twice more whenever
    a gradient passes through them. 0 for a decoder with no FLOP count."""
    spec = DECODERS.get(text_cfg.model_type)
    if spec.flops is None:
        return 0.0
    total = spec.flops(text_cfg, seq)
    attn = spec.attention_flops(text_cfg, seq) if spec.attention_flops else 0.0
    dense = (total - attn) * (1 + int(upstream) + int(trained))
    return batch * (dense + attn * (1 + 2 * int(upstream or trained)))


def register_encoder(name: str, spec: EncoderSpec, **kw) -> EncoderSpec:
    return ENCODERS.register(name, spec, **kw)


def register_connector(name: str, spec: ConnectorSpec, **kw) -> ConnectorSpec:
    return CONNECTORS.register(name, spec, **kw)


def register_decoder(name: str, spec: DecoderSpec, **kw) -> DecoderSpec:
    return DECODERS.register(name, spec, **kw)


def register_model(name: str, family: ModelFamily, **kw) -> ModelFamily:
    return MODELS.register(name, family, **kw)


def register_layout(name: str, layout: CheckpointLayout, **kw) -> CheckpointLayout:
    if name == HF_LAYOUT:
        raise ValueError(f"{HF_LAYOUT!r} names each family's own HF layout")
    return LAYOUTS.register(name, layout, **kw)


def layout_for_hf(hf: dict) -> Optional[tuple[str, CheckpointLayout]]:
    """(name, layout) of the registered layout that reads this config.json dict, or None
    (a family's HF layout reads it, if any does)."""
    for name, layout in LAYOUTS.items():
        reads = layout.reads or (lambda d, lay=layout: d.get("model_type")
                                 in lay.hf_model_types())
        if reads(hf):
            return name, layout
    return None


def recorded_layout(cfg) -> str:
    """The layout `cfg` was read from (`HF_LAYOUT` when it records none)."""
    record = cfg.get("checkpoint_layout")
    return record.name if record else HF_LAYOUT


def image_text(cfg, placeholder: str = "<image>") -> str:
    """How a prompt writes one image for this model: the placeholder, or what the layout the
    model was read from (`CheckpointLayout.image_text`), else its family
    (`ModelFamily.image_text`), wraps it in."""
    name = recorded_layout(cfg)
    hook = LAYOUTS.get(name).image_text if name != HF_LAYOUT else None
    if hook is None and is_multimodal(cfg):
        hook = family(cfg).image_text
    return hook(cfg).replace("<image>", placeholder) if hook is not None else placeholder


def family(cfg) -> ModelFamily:
    return MODELS.get(cfg.get("model_type"))


def family_for_hf(hf_model_type: str) -> tuple[str, ModelFamily]:
    """(name, family) of the model family that reads HF checkpoints of this model_type."""
    readable = {}
    for name, fam in MODELS.items():
        if fam.from_hf is not None:
            readable[name] = tuple(fam.hf_model_types())
            if hf_model_type in readable[name]:
                return name, fam
    for name, layout in LAYOUTS.items():
        readable[f"{layout.family}, {name} layout"] = tuple(layout.hf_model_types())
    listing = "; ".join(f"{', '.join(types)} (as {name})" for name, types in readable.items())
    raise UnsupportedModelError(
        f"HF model_type {hf_model_type!r} is not supported; supported: {listing}")


def encoder_for_hf(vision_model_type: str, where: str = "vision_config") -> tuple:
    """(name, spec) of the encoder that reads an HF `vision_config` of this model_type."""
    for name, spec in ENCODERS.items():
        if vision_model_type in spec.hf_model_types():
            return name, spec
    known = [t for _, spec in ENCODERS.items() for t in spec.hf_model_types()]
    raise UnsupportedModelError(
        f"{where}: vision model_type {vision_model_type!r} is not supported (supported: "
        f"{', '.join(known)})")


def check_config(cfg, where: str = "model config") -> None:
    """Raises InvalidConfigError when the model family finds a value in `cfg` that no model
    can be built from (the message names `where`, the field and the value)."""
    check = family(cfg).check
    if check is not None:
        check(cfg, where)


def language_model(cfg):
    """The language-model module for a composed config's `text` section (see
    `DecoderSpec.language_model`)."""
    spec = DECODERS.get(cfg.text.model_type)
    if spec.language_model is not None:
        return spec.language_model(cfg)
    from mllm_jax.models.llm import CausalLM
    return CausalLM(cfg)


def build_model(cfg: ml_collections.ConfigDict):
    """A Linen module for a model config (see `mllm_jax.presets`)."""
    return family(cfg).module(cfg)


def is_multimodal(cfg) -> bool:
    """Whether the model takes images together with its text (image tokens in input_ids)."""
    return family(cfg).tokens_per_image is not None


def tokens_per_image(cfg, image_size=None) -> int:
    """How many image-token positions one image fills in `input_ids` (`image_size` (h, w):
    default the configured resolution): the one answer that the model, the data pipeline,
    generation, synthetic batches and the FLOP counter all use."""
    fn = family(cfg).tokens_per_image
    if fn is None:
        raise UnsupportedModelError(f"model_type {cfg.model_type!r} takes no images")
    return int(fn(cfg, image_size))


def image_inputs(cfg, image_cfg=None):
    """How this model's images become model inputs (see `ModelFamily.image_inputs`);
    `image_cfg`: the image processor config (`data.image.ImageProcessorConfig` or a dict of
    HF's fields; None: the family's default for the model)."""
    make = family(cfg).image_inputs
    if make is None:
        from mllm_jax.data.image_inputs import FixedImages
        return FixedImages(cfg, image_cfg)
    return make(cfg, image_cfg)


def image_config(cfg, checkpoint_dir):
    """The family's own reading of a checkpoint's image processor config
    (`ModelFamily.image_config`), or None when the family has no reader of its own or the
    directory holds no config for it."""
    read = family(cfg).image_config
    return None if read is None else read(cfg, checkpoint_dir)


def image_token_id(cfg):
    """The id of the image placeholder tokens (None for a model that takes no images)."""
    return family(cfg).image_token_id(cfg) if is_multimodal(cfg) else None


def sample_inputs(cfg, data_cfg):
    """The family's builder of per-sample model inputs (see `ModelFamily.sample_inputs`), or
    None when the model reads only input ids, masks and images."""
    make = family(cfg).sample_inputs
    return None if make is None else make(cfg, data_cfg)


def sample_input_keys(cfg) -> tuple:
    """The batch keys of the model's per-sample inputs (`ModelFamily.sample_input_keys`)."""
    return tuple(family(cfg).sample_input_keys(cfg))


def image_input_keys(cfg) -> tuple:
    """Batch keys that come with a training batch's images (`ModelFamily.image_input_keys`)."""
    return tuple(family(cfg).image_input_keys(cfg))


def generates(cfg) -> bool:
    return family(cfg).generates


def init_inputs(cfg) -> tuple:
    """Arguments with which `module.init` creates every parameter (shapes only matter)."""
    return family(cfg).init_inputs(cfg)
