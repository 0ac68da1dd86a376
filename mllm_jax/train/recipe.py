"""The training config layout and the parameter regexes of the LLaVA stages.

A recipe (`configs/*.py`) is `base(preset)` plus its own overrides. `base` is the one home
of every training default; the config it returns is locked, so a recipe or an override that
names a field that does not exist is an error (`train.config_file`), not a silent new key.
Model configs (`model`) stay open: families differ in their fields."""
import copy

import ml_collections

from mllm_jax import presets, sharding
from mllm_jax.train import optimizer

# Parameter-path regexes (searched in '/'-joined paths) for the LLaVA stages.
PROJECTOR = r"^multi_modal_projector/"
LLM = r"^language_model/"
VISION = r"^vision_tower/"


def base(preset: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = presets.get(preset)
    c.init = ml_collections.ConfigDict({"hf_checkpoint": "", "orbax_checkpoint": "",
                                        "seed": 0})
    c.stage = ml_collections.ConfigDict({
        "name": "stage1",
        "trainable": [PROJECTOR],
        "objective": "lm",  # a registered objective (train.objectives): lm | dpo | blip2_stage1
        "objective_kwargs": {},  # e.g. {"beta": 0.1} for dpo
        "frozen_dtype": "",  # e.g. "bfloat16": frozen towers stored in bf16
    })
    c.train = ml_collections.ConfigDict({
        "global_batch_size": 256, "micro_batches": 1, "num_steps": 2181, "seed": 0,
        # AdamW with linear warmup + cosine decay (train.optimizer.DEFAULTS: lr,
        # warmup_ratio (or warmup_steps), end_lr_ratio, weight_decay, b1, b2, eps, grad_clip,
        # lr_groups [[name, regex, lr]],
        # e.g. [["projector", PROJECTOR, 2e-5]])
        **copy.deepcopy(optimizer.DEFAULTS),
        "loss_chunk": 2048,  # tokens per device per output-projection chunk
        "log_every": 10, "checkpoint_every": 500, "keep_checkpoints": 3,
        "async_checkpointing": True, "max_nan_streak": 5, "export_final": True,
        # Resuming (train.checkpoints): a config may differ from its checkpoint's only in
        # checkpoints.MAY_CHANGE, plus the fields of checkpoints.OPT_IN listed here (e.g.
        # ["train.lr", "train.warmup_ratio"] for a new learning-rate schedule)
        "resume_may_change": [],
        # allow a changed stage.trainable: restore the parameters and optimizer state whose
        # path and shape match the checkpoint's, initialise the rest as a fresh run would
        "resume_partial": False,
    })
    c.mesh = sharding.mesh_config(data=-1, fsdp=1, tensor=1)
    c.rules = []  # [[logical, mesh axis or list or None], ...]; empty: sharding.LOGICAL_RULES
    c.data = ml_collections.ConfigDict({"source": "synthetic", "text_len": 64, "images": 1,
                                        "seed": 0, "nan_batches": [],
                                        "distinct_batches": 0,
                                        # source "llava_json": a LLaVA-format JSON + images
                                        # (preference pairs when stage.objective is dpo)
                                        "json": "", "image_root": "", "tokenizer": "",
                                        # image paths must resolve inside image_root (else
                                        # skipped as outside_root); True reads absolute
                                        # paths wherever they are (data/paths.py)
                                        "allow_absolute_image_paths": False,
                                        "processor": "", "image_mode": "",
                                        "template": "vicuna_v1", "max_length": 2048,
                                        # where a user message's images go: as_written
                                        # (where the text has them) | llava (LLaVA's
                                        # preprocess_multimodal: images, a newline, the
                                        # stripped text; data/templates.py)
                                        "image_placement": "as_written",
                                        "workers": 4,
                                        # source "tfds": a prepared tfds_builders directory
                                        "tfds_dir": "",
                                        # InstructBLIP: the tokenizer of the instruction its
                                        # Q-Former reads (default data.tokenizer/
                                        # qformer_tokenizer) and its length (0: 128, or the
                                        # Q-Former's max_position_embeddings if fewer)
                                        "qformer_tokenizer": "", "qformer_max_length": 0,
                                        # weighted sources (replace json / tfds_dir):
                                        # [{"json" | "tfds_dir", "image_root", "weight"}]
                                        "mixture": [],
                                        # llava_json / tfds, lm and dpo objectives: several
                                        # whole samples per row of max_length tokens
                                        # (segment and position ids, each sample's images
                                        # with it; data/packing.py); a batch keeps its
                                        # global_batch_size rows, so a step sees more samples
                                        "packing": False,
                                        # images a packed row holds (0: as many as fit,
                                        # max_length // tokens per image)
                                        "packing_images": 0})
    c.distributed = ml_collections.ConfigDict({
        "enabled": False, "coordinator_address": "", "num_processes": 1, "process_id": 0,
        "cpu_collectives": "", "local_device_ids": []})
    return lock(c)


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks every section but the model's (see the module docstring)."""
    c.lock()
    c.model.unlock()
    return c


def llava15(preset: str = "llava-1.5-7b") -> ml_collections.ConfigDict:
    """What both LLaVA-1.5 stages share at scale: bf16 compute with float32 master weights,
    frozen towers stored in bf16, scanned layers with remat, the LLM's attention by the
    Pallas splash kernel on TPU (XLA elsewhere), FSDP with 2-way tensor parallelism, and
    sequences of 2048 tokens (576 image tokens, BOS, text)."""
    c = base(preset)
    c.stage.frozen_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat_policy = "dots_no_batch"
    c.model.attention = "auto"
    c.data.text_len = 2048 - 576 - 1
    # Two-way tensor parallelism: stage 2's batch of 128 then splits over the 128 batch
    # shards of a 256-chip pod (v5e-256, v6e-256), and each chip gathers half of every
    # weight (`mllm-jax plan` shows the memory and collectives per chip).
    c.mesh.update(data=1, fsdp=-1, tensor=2)
    return c
