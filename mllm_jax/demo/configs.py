"""The demo's settings (`Settings`, one per scale) and the training configs of its stages.

Scales: "default" is what `mllm-jax demo` runs (about ten minutes on two CPU cores);
"test" is a scaled-down run of every phase for the test suite (about a minute).
"""
from __future__ import annotations

import dataclasses

import ml_collections

from mllm_jax import config as mc
from mllm_jax.demo import shapes
from mllm_jax.train import recipe

# Stages in order: name, what trains, objective, the data file (per split "train"). As in
# LLaVA, the vision tower stays frozen throughout: tuning it in stage 2 (lr 1e-3) blurs the
# per-object patch features the region-phrase pre-training taught it.
STAGES = (("stage1", (recipe.PROJECTOR,), "lm", "captions"),
          ("stage2", (recipe.PROJECTOR, recipe.LLM), "lm", "instruct"),
          ("stage3", (recipe.PROJECTOR, recipe.LLM), "dpo", "preference"))
# With the Q-Former connector (`demo.qformer`): its stage-1 representation pre-training
# comes first; stage 1 is then BLIP-2's generative pre-training (Q-Former + projection on
# captions, ViT and LLM frozen), stage 2 instruction tuning. The LLM trains in stage 2, as
# in the LLaVA demo, not frozen as in InstructBLIP: InstructBLIP's LLM already follows
# instructions, the demo's has only read the world's text. Frozen, it learned no yes/no
# answers (400 steps at the default scale: loss 2.0, existence 0.46, colour 0.0, POPE F1 0;
# trained: loss 0.40, existence 0.52, count 0.71, colour 0.34, POPE F1 0.65).
QFORMER_STAGES = (("stage1", (recipe.PROJECTOR,), "lm", "captions"),
                  ("stage2", (recipe.PROJECTOR, recipe.LLM), "lm", "instruct"))
CONNECTORS = {"mlp": STAGES, "qformer": QFORMER_STAGES}
# The Q-Former connector's queries and layers (`Settings.qformer_lr`), not its projection.
QFORMER_PARAMS = r"^multi_modal_projector/(query_tokens|qformer/)"


@dataclasses.dataclass(frozen=True)
class StageRun:
    steps: int
    batch: int
    lr: float
    warmup: float = 0.05
    max_length: int = 128  # tokens per sequence (image tokens included)
    beta: float = 0.1  # DPO only


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a demo run depends on besides the machine."""
    seed: int = 0
    train_scenes: int = 6000
    eval_scenes: int = 150
    # Images and vision tower: scenes rendered at `image_size` px (shapes.World, 3x3 grid);
    # 48 px with 16 px patches puts one grid cell in each of 9 image tokens.
    image_size: int = 48
    patch_size: int = 16
    # Objects: the small size as a fraction of a cell, and how far objects move in their cell
    # (shapes.World.jitter). Small 8 px shapes that wander over their whole cell are more than
    # a two-layer ViT learns to tell apart in minutes.
    object_small: float = 0.7
    object_jitter: float = 0.25
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    vocab_size: int = 512
    # Share of training scenes whose captions name an absent companion of a present object
    # (shapes.World.hallucination_rate): the data bias the stage-2 model picks up and DPO
    # removes.
    hallucination_rate: float = 0.6
    # "No" existence questions about an absent object whose colour and shape both occur in
    # the scene (shapes.World.confusable_rate): they teach binding colours to shapes.
    confusable_rate: float = 0.3
    # The instruction mixture (question kinds and weights, questions per image, of
    # `shapes.write_dataset`): yes/no and one-word answers weigh more than the world's
    # default, whose long captions and boxes hold most of the answer tokens.
    instruct_weights: tuple = tuple({**shapes.INSTRUCT_WEIGHTS, "existence": 6, "colour": 4,
                                     "count": 3}.items())
    instruct_turns: int = 5
    # Pre-training of the towers (text_lm.max_length: tokens per packed sequence).
    contrastive: StageRun = StageRun(steps=400, batch=64, lr=1e-3)
    # Weight of the region-phrase loss in contrastive pre-training (0: whole images only).
    region_weight: float = 1.0
    text_lm: StageRun = StageRun(steps=300, batch=16, lr=3e-3, max_length=128)
    # The LLaVA stages.
    stage1: StageRun = StageRun(steps=150, batch=32, lr=2e-3, max_length=56)
    stage2: StageRun = StageRun(steps=1500, batch=16, lr=1e-3, max_length=128)
    stage3: StageRun = StageRun(steps=60, batch=16, lr=1e-5, max_length=96, beta=0.5)
    # `--connector qformer` (demo.qformer): BLIP-2's querying transformer between the ViT
    # and the LLM, `qformer_queries` output tokens per image (instead of the ViT's patches);
    # `qformer_pretrain` is its stage-1 representation pre-training (ITC/ITM/ITG, frozen
    # ViT), `qformer_stage1` / `qformer_stage2` the LLaVA stages 1 and 2 with this connector
    # (BLIP-2's generative pre-training, then instruction tuning).
    qformer_queries: int = 8
    # InstructBLIP's instruction-aware Q-Former: the queries also read the sample's
    # questions (the LLM's tokenizer, `qformer_instruction_tokens` at most).
    qformer_instruction: bool = False
    qformer_instruction_tokens: int = 64
    qformer_hidden: int = 128
    qformer_layers: int = 2
    qformer_heads: int = 4
    # Dropout on the Q-Former's hidden states and attention probabilities (BLIP-2's 0.1); it
    # is on only in its stage-1 pre-training (the LLaVA stages run it deterministically).
    qformer_dropout: float = 0.1
    qformer_pretrain: StageRun = StageRun(steps=400, batch=64, lr=1e-3, max_length=32)
    # The texts of its pairs (`demo.qformer.pretrain_pairs`): "phrases", one pair per object
    # (its region phrase, "a small red circle."); "captions", the image's caption (every
    # object in one sentence); or "both". Matched against captions, the best query can
    # stand for the whole scene, and the LLM reading the queries answered existence
    # questions at chance (0.56); matched against phrases, every object needs a query that
    # matches it alone (existence 0.77 in the default run).
    qformer_pretrain_texts: str = "phrases"
    # The learning rate of the queries and the Q-Former in the LLaVA stages (BLIP-2's stage
    # 2 uses 1e-4); its projection trains at the stage's. From the same stage-1 Q-Former,
    # existence after stage 2: 0.567 at 1e-5, 0.747 at 3e-5, 0.773 at 1e-4, 0.813 at 3e-4.
    qformer_lr: float = 1e-4
    qformer_stage1: StageRun = StageRun(steps=150, batch=32, lr=2e-3, max_length=56)
    qformer_stage2: StageRun = StageRun(steps=1500, batch=16, lr=1e-3, max_length=128)
    # Stage 3 pairs: the first `world_pairs` of the world's preference pairs (an absent
    # companion added; 0: none), the first `yesno_pairs` of its existence-question pairs
    # (the faithful "yes" / "no" chosen; 0: none), and the stage-2 model's own
    # hallucinations on `on_policy_scenes` training images (0: none); see `demo.preference`.
    world_pairs: int = 1000
    yesno_pairs: int = 1000
    on_policy_scenes: int = 1000
    # Evaluation.
    eval_batch: int = 128
    short_new_tokens: int = 48  # answers to questions
    long_new_tokens: int = 96  # captions

    def stage(self, name: str) -> StageRun:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SCALES = {
    "default": Settings(),
    "test": Settings(train_scenes=400, eval_scenes=12, vision_hidden=32, vision_layers=1,
                     vision_heads=2, text_hidden=64, text_layers=1, text_heads=2,
                     contrastive=StageRun(steps=10, batch=16, lr=1e-3),
                     text_lm=StageRun(steps=10, batch=16, lr=2e-3),
                     stage1=StageRun(steps=16, batch=16, lr=3e-3, max_length=56),
                     stage2=StageRun(steps=60, batch=16, lr=3e-3, max_length=128),
                     stage3=StageRun(steps=4, batch=8, lr=5e-5, max_length=96),
                     world_pairs=64, yesno_pairs=64, on_policy_scenes=64, eval_batch=64,
                     short_new_tokens=24, long_new_tokens=48, qformer_queries=4,
                     qformer_hidden=32, qformer_layers=1, qformer_heads=2,
                     qformer_dropout=0.0,
                     qformer_pretrain=StageRun(steps=10, batch=16, lr=1e-3, max_length=32),
                     qformer_stage1=StageRun(steps=16, batch=16, lr=3e-3, max_length=56),
                     qformer_stage2=StageRun(steps=60, batch=16, lr=3e-3, max_length=128)),
}


def settings_for(scale: str | Settings, seed: int | None = None) -> Settings:
    """The settings of a named scale (or the given ones), with `seed` if given."""
    if isinstance(scale, Settings):
        s = scale
    elif scale in SCALES:
        s = SCALES[scale]
    else:
        raise ValueError(f"unknown demo scale {scale!r}; known: {sorted(SCALES)}")
    return s if seed is None else dataclasses.replace(s, seed=int(seed))


def world(s: Settings) -> shapes.World:
    """The shapes world the demo renders: the default world at `s.image_size` px with the
    settings' object sizes, jitter, companion bias and confusable negatives."""
    return shapes.World(image_size=s.image_size, small=s.object_small, jitter=s.object_jitter,
                        hallucination_rate=s.hallucination_rate,
                        confusable_rate=s.confusable_rate)


def image_tokens(s: Settings) -> int:
    return (s.image_size // s.patch_size) ** 2


def model_config(s: Settings, image_token_id: int, connector: str = "mlp"
                 ) -> ml_collections.ConfigDict:
    """The LLaVA config: ViT -> connector -> LLaMA, vocabulary = tokenizer's. Connector "mlp":
    the 2-layer MLP projector over the ViT's patch tokens; "qformer": a Q-Former
    (`qformer_config`) whose queries replace the patch tokens."""
    if connector not in CONNECTORS:
        raise ValueError(f"unknown demo connector {connector!r}; known: {list(CONNECTORS)}")
    v = mc.vision_config(hidden_size=s.vision_hidden, intermediate_size=4 * s.vision_hidden,
                         num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                         image_size=s.image_size, patch_size=s.patch_size)
    t = mc.text_config(vocab_size=s.vocab_size, hidden_size=s.text_hidden,
                       intermediate_size=int(8 * s.text_hidden / 3) // 16 * 16,
                       num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                       num_key_value_heads=s.text_heads,
                       head_dim=s.text_hidden // s.text_heads, max_position_embeddings=512,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if connector == "qformer":
        return mc.llava_config(vision=v, text=t, projector=qformer_config(s),
                               image_token_index=image_token_id,
                               image_seq_length=s.qformer_queries, vision_feature_layer=-1)
    return mc.llava_config(vision=v, text=t, image_token_index=image_token_id,
                           image_seq_length=image_tokens(s), vision_feature_layer=-1)


def qformer_config(s: Settings) -> ml_collections.ConfigDict:
    """The demo's Q-Former: `qformer_layers` BERT layers of width `qformer_hidden`, each
    cross-attending to the ViT's patch tokens (BLIP-2 does so every second layer of twelve;
    with two layers both read the image), `qformer_queries` queries."""
    from mllm_jax.models.connectors.qformer import qformer_config as base
    # The vocabulary is the world's plus the stage-1 decoder token (`demo.qformer`), so the
    # stage-1 text embeddings fit an instruction-aware Q-Former.
    return base(model_type="instructblip_qformer" if s.qformer_instruction
                else "blip_2_qformer",
                num_query_tokens=s.qformer_queries, hidden_size=s.qformer_hidden,
                num_hidden_layers=s.qformer_layers, num_attention_heads=s.qformer_heads,
                intermediate_size=4 * s.qformer_hidden, cross_attention_frequency=1,
                encoder_hidden_size=s.vision_hidden, vocab_size=s.vocab_size + 1,
                max_position_embeddings=128, pad_token_id=3,
                hidden_dropout_prob=s.qformer_dropout,
                attention_probs_dropout_prob=s.qformer_dropout)


def stage_config(s: Settings, name: str, model: ml_collections.ConfigDict, data_dir: str,
                 tokenizer_dir: str, init_dir: str, json_path: str | None = None,
                 connector: str = "mlp") -> ml_collections.ConfigDict:
    """The `train.loop.train` config of LLaVA stage `name` (of `CONNECTORS[connector]`),
    starting from `init_dir`, on `json_path` (default: the stage's file of the world's train
    split; images under `data_dir` either way)."""
    spec = {n: (trainable, objective, data) for n, trainable, objective, data in
            CONNECTORS[connector]}
    if name not in spec:
        raise ValueError(f"unknown demo stage {name!r}; known: {list(spec)}")
    trainable, objective, data = spec[name]
    run = s.stage(name if connector == "mlp" else f"{connector}_{name}")
    c = recipe.base("tiny-llava")
    c.model = model
    c.init.orbax_checkpoint = init_dir
    c.stage.update(name=name, trainable=list(trainable), objective=objective)
    if objective == "dpo":
        c.stage.objective_kwargs = {"beta": run.beta}
    c.train.update(lr=run.lr, warmup_ratio=run.warmup, weight_decay=0.0)
    c.train.update(global_batch_size=run.batch, num_steps=run.steps, seed=s.seed,
                   log_every=max(1, run.steps // 10), checkpoint_every=run.steps + 1,
                   keep_checkpoints=1, async_checkpointing=False, export_final=True)
    c.data.update(source="llava_json", json=json_path or f"{data_dir}/{data}_train.json",
                  image_root=data_dir, tokenizer=tokenizer_dir, template="mistral",
                  max_length=run.max_length, workers=2, images=1, seed=s.seed)
    if connector == "qformer":
        c.train.lr_groups = [["qformer", QFORMER_PARAMS, s.qformer_lr]]
        if s.qformer_instruction:
            c.data.qformer_max_length = s.qformer_instruction_tokens
    return c
