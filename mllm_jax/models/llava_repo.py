"""LLaVA checkpoints in the LLaVA repository's layout: haotian-liu/LLaVA's
`LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM` (config.json model_type `llava_llama` /
`llava_mistral`; `llava` in the first LLaVA-1.5 releases, told from HF's by its
`mm_vision_tower` and no `text_config`) and LLaVA-NeXT's `LlavaQwenForCausalLM`
(`llava_qwen`). They load into the composed LLaVA model (`model_type` llava: the module and
parameter paths an HF `LlavaForConditionalGeneration` checkpoint gives) and are written back
as they were (`save_hf` layout "llava_repo", the default for a model read from it).

Stored names (the repository's modules under transformers 4.37, the version it pins) and
the canonical (HF LLaVA) names they are read as:
  model.embed_tokens, model.layers.N.*, model.norm   language_model.model.*
  lm_head                                            language_model.lm_head
  model.mm_projector.0 / .2 (mlp2x_gelu)             multi_modal_projector.linear_1 / _2
  model.mm_projector (linear)                        multi_modal_projector.linear_1
  model.vision_tower.vision_tower.vision_model.*     vision_tower.vision_model.*
The tower's tensors may be absent (the repository reads the tower from `mm_vision_tower`
unless it was unfrozen); they are then read from the tower's own directory, and not written.

config.json holds the LLM's fields at top level and LLaVA's `mm_*` fields, and names the
tower (`mm_vision_tower`: a path, often a hub id) instead of holding its config: the
tower's config.json comes from that directory when it is a local one, or from the directory
given as `load_hf(..., vision_tower=DIR)` (a CLIPVisionModel or CLIPModel checkpoint).

The image token: the repository marks each image by the id -200 (`IMAGE_TOKEN_INDEX`), which
has no vocabulary row; our model puts image features where `input_ids` hold
`image_token_index`, one per feature. So the stored vocabulary (V rows) gains one id, V: the
input embedding and an untied output head are read with one more row, holding the mean of the
stored rows (as the repository's `initialize_vision_tokenizer` fills the tokens it adds).
The input row is never used (image features replace it); the logit of id V is never wanted
(no label is V, and its mean row gives it the mean logit, below the best): compare
`logits[..., :V]` with the repository's. Writing this layout drops the row again.
`llava_repo_inputs` turns the repository's input ids (-200 per image) into ours and holds
the prompt and image settings it honours (`mm_use_im_start_end`, `image_aspect_ratio`).

Settings this model cannot honour are refused naming the field, its value and what is
supported: LLaVA-NeXT's high-resolution tiling (`image_aspect_ratio` anyres,
`mm_patch_merge_type` spatial / spatial_unpad), towers other than CLIP, projectors other
than linear and mlp2x_gelu, resamplers, multi-layer feature slices.
"""
import json
import os
import re

import ml_collections
import numpy as np

from mllm_jax import config as mc
from mllm_jax import jsonfile
from mllm_jax.models.llava import check_llava_fields
from mllm_jax.models.registry import (DECODERS, ENCODERS, CheckpointLayout, InvalidConfigError,
                                      UnsupportedModelError, recorded_layout, register_layout)

NAME = "llava_repo"
IMAGE_TOKEN_INDEX = -200  # llava/constants.py
# config.json model_type -> the LLM (our decoder).
TEXT_MODEL_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2",
                    "llava": "llama"}
PROJECTORS = ("linear", "mlp2x_gelu")
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}  # -> vision_feature_select_strategy
ASPECT_RATIOS = (None, "square", "pad")
MERGE_TYPES = ("flat",)
TOWER_TYPES = ("clip_vision_model", "clip")
TOWER_PREFIX = "model.vision_tower.vision_tower."
TOWER_PARTS = re.compile(r"^(vision_model\.)?(embeddings|encoder|pre_layrnorm|post_layernorm)\.")
PADDED = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")


def reads(hf: dict) -> bool:
    model_type = hf.get("model_type")
    if model_type == "llava":
        return "mm_vision_tower" in hf and "text_config" not in hf
    return model_type in TEXT_MODEL_TYPES


# ---- config.json -> our config ---------------------------------------------------------


def _refuse_unsupported(hf: dict, where: str) -> None:
    def refuse(field, value, supported, why=""):
        raise UnsupportedModelError(
            f"{where}: {field} = {value!r} is not supported (supported: {supported}){why}")

    merge = hf.get("mm_patch_merge_type", "flat")
    if merge not in MERGE_TYPES:
        refuse("mm_patch_merge_type", merge, "'flat'",
               "; 'spatial' / 'spatial_unpad' are LLaVA-NeXT's tiles of high-resolution "
               "images, which this model does not implement")
    aspect = hf.get("image_aspect_ratio")
    if aspect not in ASPECT_RATIOS:
        refuse("image_aspect_ratio", aspect, "'pad', 'square' or none",
               "; 'anyres' is LLaVA-NeXT's tiling of high-resolution images, which this "
               "model does not implement")
    projector = hf.get("mm_projector_type", "linear")
    if projector not in PROJECTORS:
        refuse("mm_projector_type", projector, ", ".join(PROJECTORS))
    feature = hf.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURES:
        refuse("mm_vision_select_feature", feature, ", ".join(SELECT_FEATURES))
    if hf.get("mm_resampler_type") is not None:
        refuse("mm_resampler_type", hf["mm_resampler_type"], "none")
    if hf.get("mm_use_im_start_end") and hf.get("tune_mm_mlp_adapter"):
        raise UnsupportedModelError(
            f"{where}: mm_use_im_start_end and tune_mm_mlp_adapter are both true, which the "
            "LLaVA repository's own forward refuses (image start/end tokens are not "
            "implemented for pre-training); set tune_mm_mlp_adapter to false for a "
            "fine-tuned model")


def _tower_directory(hf: dict, where: str, directory, vision_tower) -> str:
    if vision_tower is not None:
        if not os.path.isdir(vision_tower):
            raise FileNotFoundError(
                f"vision_tower={vision_tower!r} is not a directory; give the directory of the "
                "vision tower's checkpoint (a CLIPVisionModel or CLIPModel: config.json + "
                "*.safetensors)")
        return vision_tower
    name = hf.get("mm_vision_tower", hf.get("vision_tower"))
    if not isinstance(name, str) or not name:
        raise InvalidConfigError(f"{where}: mm_vision_tower = {name!r} must name the vision "
                                 "tower (its directory or hub id)")
    # As the repository: a path relative to the working directory; also one relative to
    # the checkpoint, so a tower copied beside its checkpoint is found wherever one runs.
    places = [name] if os.path.isabs(name) else (
        ([os.path.join(directory, name)] if directory else []) + [name])
    for place in places:
        if os.path.isdir(place):
            return place
    raise UnsupportedModelError(
        f"{where}: mm_vision_tower = {name!r} is not a local directory (a hub id?), and "
        "config.json does not hold the tower's config. Download that tower (a CLIPVisionModel "
        "or CLIPModel checkpoint directory) and name it: load_hf("
        f"{directory or 'CHECKPOINT'!r}, vision_tower='path/to/{os.path.basename(name)}') "
        "(mllm-jax convert hf-to-orbax: --vision-tower DIR)")


def _vision_config(hf: dict, where: str, tower_dir: str):
    tower_hf = jsonfile.read_object(os.path.join(tower_dir, "config.json"),
                                    "restore the vision tower's config.json")
    kind = tower_hf.get("model_type")
    if kind not in TOWER_TYPES:
        raise UnsupportedModelError(
            f"{where}: mm_vision_tower = {hf.get('mm_vision_tower')!r} ({tower_dir}) is a "
            f"{kind!r} tower; supported: CLIP (model_type {' or '.join(TOWER_TYPES)})")
    vision = ENCODERS.get("clip").from_hf(tower_hf, os.path.join(tower_dir, "config.json"))
    if hf.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise InvalidConfigError(
            f"{where}: mm_hidden_size = {hf['mm_hidden_size']!r}, but the vision tower in "
            f"{tower_dir} is {vision.hidden_size} wide; name the tower the model was trained "
            "with")
    return vision


def _select_layer(hf: dict, where: str, layers: int) -> int:
    layer = hf.get("mm_vision_select_layer")
    if isinstance(layer, bool) or not isinstance(layer, int) or not -layers - 1 <= layer <= layers:
        raise InvalidConfigError(
            f"{where}: mm_vision_select_layer = {layer!r} must be a layer of the "
            f"{layers}-layer vision tower (an integer from {-layers - 1} to {layers}; the "
            "repository's checkpoints give -2)")
    return layer


def _text_config(hf: dict, where: str):
    text_type = TEXT_MODEL_TYPES[hf["model_type"]]
    text_hf = dict(hf, model_type=text_type)
    if text_type == "qwen2":
        # LlavaQwenForCausalLM sets config.rope_scaling = None before building its model.
        text_hf["rope_scaling"] = None
        if hf.get("rope_parameters"):
            text_hf["rope_parameters"] = {
                "rope_theta": hf["rope_parameters"].get("rope_theta",
                                                        hf.get("rope_theta", 10000.0))}
    return DECODERS.get(text_type).from_hf(text_hf, where)


def from_hf(hf: dict, where: str = "config.json", directory=None, vision_tower=None):
    """Our LLaVA config for a LLaVA-repository config.json, recording the layout (the
    config.json as read, the stored vocabulary size, where the tower's tensors are)."""
    _refuse_unsupported(hf, where)
    text = _text_config(hf, where)
    tower_dir = _tower_directory(hf, where, directory, vision_tower)
    vision = _vision_config(hf, where, tower_dir)
    layer = _select_layer(hf, where, vision.num_hidden_layers)
    strategy = SELECT_FEATURES[hf.get("mm_vision_select_feature", "patch")]
    vocab = text.vocab_size
    text.vocab_size = vocab + 1  # + the image token (see the module docstring)
    tokens = (vision.image_size // vision.patch_size) ** 2 + (strategy == "full")
    check_llava_fields(dict(image_token_index=vocab, image_seq_length=tokens,
                            vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                            vision_layers=vision.num_hidden_layers), where)
    projector = mc.projector_config(type=hf.get("mm_projector_type", "linear"), bias=True,
                                    hidden_act="gelu")
    cfg = mc.llava_config(vision=vision, text=text, projector=projector,
                          image_token_index=vocab, vision_feature_select_strategy=strategy,
                          image_seq_length=tokens)
    cfg.vision_feature_layer = layer
    cfg.checkpoint_layout = ml_collections.ConfigDict(dict(
        name=NAME, config_json=json.dumps(hf, sort_keys=True), vocab_size=vocab,
        tower_in_checkpoint=_tower_in_checkpoint(directory),
        vision_tower_directory=os.path.abspath(tower_dir),
        model=json.dumps(_model_fields(cfg), sort_keys=True)))
    return cfg


def _tower_in_checkpoint(directory) -> bool:
    if directory is None:
        return True
    from mllm_jax.convert.safetensors_io import CheckpointReader
    return any(k.startswith(TOWER_PREFIX) for k in CheckpointReader(directory).keys())


def _model_fields(cfg) -> dict:
    """What the model computes, as config.json describes it: the fields that must not
    change for config.json (kept as read) to describe the model written back."""
    fields = {k: cfg[k] for k in ("image_token_index", "vision_feature_layer",
                                  "vision_feature_select_strategy", "image_seq_length")}
    fields.update({k: cfg[k].to_dict() for k in ("text", "vision", "projector")})
    return json.loads(json.dumps(fields))


# ---- our config -> config.json -----------------------------------------------------------


def _differences(then, now, prefix=""):
    for k in sorted(set(then) | set(now)):
        a, b = then.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            yield f"{prefix}{k}: {a!r} when read, {b!r} now"


def to_hf(cfg) -> dict:
    """The config.json the model was read from, as it was (its LLaVA training settings and
    tower name included), once the model is checked to be still what it describes."""
    record = cfg.get("checkpoint_layout")
    if not record or record.name != NAME:
        raise UnsupportedModelError(
            f"layout {NAME!r} writes models read from it (it keeps their config.json, which "
            "names the vision tower and holds LLaVA's training settings); this model was "
            f"read from the {recorded_layout(cfg)!r} layout: write it with layout='hf'")
    changed = list(_differences(json.loads(record.model), _model_fields(cfg)))
    if changed:
        raise UnsupportedModelError(
            f"the model differs from the LLaVA-repository config.json it was read from "
            f"({'; '.join(changed[:4])}), which layout {NAME!r} writes back as it was; write "
            "it with layout='hf', or load a checkpoint of this shape")
    return json.loads(record.config_json)


# ---- tensor names, the padded row, the tower's directory --------------------------------


def canonical_key(cfg, key: str) -> str:
    if key.startswith(TOWER_PREFIX):
        rest = key[len(TOWER_PREFIX):]
        return "vision_tower." + (rest if rest.startswith("vision_model.") else
                                  "vision_model." + rest)
    m = re.match(r"^model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$", key)
    if m and (m[1] is None) == (cfg.projector.type == "linear"):
        index = 0 if m[1] is None else int(m[1])
        if index % 2 == 0:  # nn.Sequential(Linear, GELU, Linear): Linears at 0, 2
            return f"multi_modal_projector.linear_{index // 2 + 1}.{m[2]}"
    if key.startswith("model."):
        return "language_model." + key
    if key.startswith("lm_head."):
        return "language_model." + key
    return key


def stored_key(cfg, key: str):
    if key.startswith("vision_tower."):
        if not cfg.checkpoint_layout.tower_in_checkpoint:
            return None  # the tower stays in its own directory (mm_vision_tower)
        return TOWER_PREFIX + key[len("vision_tower."):]
    m = re.match(r"^multi_modal_projector\.linear_(\d+)\.(weight|bias)$", key)
    if m:
        if cfg.projector.type == "linear":
            return f"model.mm_projector.{m[2]}"
        return f"model.mm_projector.{2 * (int(m[1]) - 1)}.{m[2]}"
    if key.startswith("language_model."):
        return key[len("language_model."):]
    raise ValueError(f"{key!r} has no name in the LLaVA repository's layout")


def stored_shape(cfg, key: str, shape) -> tuple:
    shape = tuple(shape)
    return (shape[0] - 1,) + shape[1:] if key in PADDED else shape


def from_stored(cfg, key: str, array):
    """The stored embedding / output head with the image token's row (V) appended: the
    mean of the stored rows."""
    if key not in PADDED:
        return array
    mean = np.asarray(array, np.float32).mean(axis=0, keepdims=True)
    return np.concatenate([np.asarray(array), mean.astype(array.dtype)], axis=0)


def to_stored(cfg, key: str, array):
    """The embedding / output head without the image token's row."""
    if key not in PADDED:
        return array
    vocab = cfg.checkpoint_layout.vocab_size
    if array.shape[0] != vocab + 1:
        raise ValueError(f"{key}: {array.shape[0]} rows, expected {vocab} stored + 1 image "
                         "token row")
    return array[:vocab]


def open_reader(cfg, directory):
    """The checkpoint's tensors, with the tower's from its own directory when the checkpoint
    holds none (a CLIPVisionModel's or a CLIPModel's vision part, read under the stored
    names)."""
    from mllm_jax.convert.joined_reader import JoinedReader
    from mllm_jax.convert.safetensors_io import CheckpointReader
    reader = CheckpointReader(directory)
    record = cfg.checkpoint_layout
    if record.tower_in_checkpoint:
        return reader
    tower = CheckpointReader(record.vision_tower_directory)
    return JoinedReader(directory, [
        (reader, lambda k: k),
        (tower, lambda k: TOWER_PREFIX + k if TOWER_PARTS.match(k) else None)])


register_layout(NAME, CheckpointLayout(
    family="llava", hf_model_types=lambda: ("llava_llama", "llava_mistral", "llava_qwen"),
    reads=reads, from_hf=from_hf, to_hf=to_hf, canonical_key=canonical_key,
    stored_key=stored_key, stored_shape=stored_shape, from_stored=from_stored,
    to_stored=to_stored, open_reader=open_reader,
    image_text=lambda cfg: _inputs().image_text(cfg)))


def _inputs():
    from mllm_jax.models import llava_repo_inputs  # it imports this module
    return llava_repo_inputs
