"""The inputs of a model read from the LLaVA repository's layout (`models.llava_repo`), as the
repository builds them: its input ids (-200 per image) turned into ours, the prompt text of
an image (`mm_use_im_start_end`), and the image preprocessing (`image_aspect_ratio`).

These settings live on the data side, not in the model: the repository applies them in its
prompt building (`llava/train/train.py` preprocess_multimodal, `llava/eval/run_llava.py`)
and its `process_images` (`llava/mm_utils.py`). Each function reads them from the
config.json the model was read from, which the model config records.
"""
import json

from mllm_jax.data import image as image_lib
from mllm_jax.data.tokens import expand_image_tokens
from mllm_jax.models.llava_repo import IMAGE_TOKEN_INDEX, NAME

IMAGE_PLACEHOLDER = "<image>"  # llava/constants.py DEFAULT_IMAGE_TOKEN
IM_START, IM_END = "<im_start>", "<im_end>"  # DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN


def repo_config(cfg) -> dict:
    """The LLaVA-repository config.json `cfg` was read from."""
    record = cfg.get("checkpoint_layout")
    if not record or record.name != NAME:
        raise ValueError(f"this model was not read from the {NAME!r} layout (load_hf of a "
                         "LLaVA-repository checkpoint records it)")
    return json.loads(record.config_json)


def model_input_ids(input_ids, cfg) -> list:
    """The repository's input ids of one sequence (`tokenizer_image_token`: one -200 per
    image) -> ours: each -200 becomes `image_seq_length` copies of `image_token_index` (the
    id added for it), one per image feature."""
    ids = expand_image_tokens([int(i) for i in input_ids], IMAGE_TOKEN_INDEX,
                              cfg.image_seq_length)
    return [cfg.image_token_index if i == IMAGE_TOKEN_INDEX else i for i in ids]


def image_text(cfg) -> str:
    """What the prompt holds for one image: `<im_start><image><im_end>` when the model was
    trained with `mm_use_im_start_end` (its tokenizer then holds those two tokens), else
    `<image>`."""
    if repo_config(cfg).get("mm_use_im_start_end"):
        return IM_START + IMAGE_PLACEHOLDER + IM_END
    return IMAGE_PLACEHOLDER


def wrap_image_placeholders(text: str, cfg) -> str:
    """`text` with each `<image>` written as the model was trained to see it (`image_text`);
    apply it to conversation turns before the template tokenizes them."""
    return text.replace(IMAGE_PLACEHOLDER, image_text(cfg))


def image_processor_config(cfg, tower_dir=None) -> image_lib.ImageProcessorConfig:
    """The image preprocessing the repository applies: its tower's processor (the
    preprocessor_config.json in `tower_dir`, else CLIP's at the tower's resolution) after
    `expand2square` onto the mean colour when `image_aspect_ratio` is "pad" (mode "pad"),
    else as the processor gives (mode "crop")."""
    mode = "pad" if repo_config(cfg).get("image_aspect_ratio") == "pad" else "crop"
    if tower_dir is not None:
        return image_lib.load_image_processor_config(tower_dir, mode=mode)
    size = cfg.vision.image_size
    return image_lib.ImageProcessorConfig(mode=mode, size={"shortest_edge": size},
                                          crop_size=size)
