"""InstructBLIP trains with its instruction-aware Q-Former: the training batches carry each
sample's instruction in the Q-Former's tokenizer (`qformer_input_ids`, as
`InstructBlipProcessor` encodes it), the `lm` objective gives the Q-Former that instruction
(the loss equals transformers' on the same inputs), and the Q-Former's text embeddings
train."""
import json
import os

import flax
import jax
import numpy as np
import pytest
import torch
from PIL import Image

import hf_blip2_factories as F
import mllm_jax
from mllm_jax.data.sources import make_data
from mllm_jax.models import blip2  # noqa: F401  (registers the families)
from mllm_jax.models.registry import ENCODERS
from mllm_jax.train import blip2_stages, recipe, step as step_lib
from mllm_jax.train.loop import train

pytestmark = pytest.mark.skipif("eva" not in ENCODERS,
                                reason="needs the eva encoder (BLIP-2's ViT)")

QUESTIONS = [("what is in the picture ?", "a red square"),
             ("what color is the square ?", "red"),
             ("is the square left ?", "w3 w4"),
             ("what is left in the picture ?", "a w7")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(checkpoint directory, HF model, processor, LLaVA-format data file)."""
    root = tmp_path_factory.mktemp("instructblip_train")
    d = str(root / "ckpt")
    hf, processor = F.instructblip_checkpoint(d, seed=5)
    records = []
    for k, (q, a) in enumerate(QUESTIONS):
        name = f"img{k}.png"
        F.random_image(root / name, seed=k)
        records.append({"id": f"s{k}", "image": name,
                        "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                          {"from": "gpt", "value": a}]})
    data = root / "train.json"
    data.write_text(json.dumps(records))
    return d, hf, processor, str(data)


def _config(checkpoint, batch=4):
    d, _, _, data = checkpoint
    c = recipe.base("tiny-llava")
    model, _ = mllm_jax.load_hf(d)
    c.model = model.cfg
    c.stage.update(name="instructblip", trainable=[blip2_stages.QFORMER])
    c.train.update(global_batch_size=batch, num_steps=2, lr=3e-2, warmup_ratio=0.0,
                   log_every=1, checkpoint_every=10, async_checkpointing=False)
    c.data.update(source="llava_json", json=data, image_root=os.path.dirname(data),
                  tokenizer=d, template="vicuna_v1", max_length=48, images=1, workers=0)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    return c


def test_batches_carry_each_instruction_as_the_processor_encodes_it(checkpoint):
    _, _, processor, _ = checkpoint
    data = make_data(_config(checkpoint), 0, 1)
    batch = next(data)
    ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    # The Q-Former reads at most min(128, max_position_embeddings) tokens.
    assert ids.shape == mask.shape == (4, F.QFORMER["max_position_embeddings"])
    assert sorted(data.last_sample_ids) == [f"s{k}" for k in range(4)]
    for row, sample in enumerate(data.last_sample_ids):
        want = processor.qformer_tokenizer(QUESTIONS[int(sample[1:])][0])["input_ids"]
        assert list(ids[row, :mask[row].sum()]) == want
        assert not mask[row, len(want):].any()


def test_the_lm_loss_reads_the_instruction_as_transformers_does(checkpoint):
    d, hf, _, _ = checkpoint
    model, params = mllm_jax.load_hf(d)
    batch = next(make_data(_config(checkpoint), 0, 1))
    total, n, _ = step_lib.lm_objective(model, params, batch, None)
    ours = float(total) / float(n)
    targets = torch.tensor(np.concatenate([batch["labels"][:, 1:],
                                           np.full((4, 1), -100)], axis=1)).long()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(batch["input_ids"]).long(),
                    attention_mask=torch.tensor(batch["attention_mask"]).long(),
                    pixel_values=torch.tensor(batch["pixel_values"][:, 0]).permute(0, 3, 1, 2),
                    qformer_input_ids=torch.tensor(batch["qformer_input_ids"]).long(),
                    qformer_attention_mask=torch.tensor(batch["qformer_attention_mask"]).long(),
                    ).logits
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1), ignore_index=-100)
    assert ours == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    # Another sample's instruction gives another loss: the instruction is read.
    swapped = dict(batch, qformer_input_ids=batch["qformer_input_ids"][::-1],
                   qformer_attention_mask=batch["qformer_attention_mask"][::-1])
    other, _, _ = step_lib.lm_objective(model, params, swapped, None)
    assert abs(float(other) / float(n) - ours) > 1e-4
    without = {k: v for k, v in batch.items() if not k.startswith("qformer_")}
    with pytest.raises(ValueError, match="qformer_input_ids"):
        step_lib.lm_objective(model, params, without, None)


def test_tuning_trains_the_q_former_text_embeddings(checkpoint, tmp_path):
    d, _, _, _ = checkpoint
    c = _config(checkpoint)
    model, init = mllm_jax.load_hf(d)
    mllm_jax.save_orbax(model, init, str(tmp_path / "init"))
    c.init.orbax_checkpoint = str(tmp_path / "init")
    summary = train(c, str(tmp_path / "run"), log=lambda *_: None, devices=jax.devices()[:1])
    assert summary["step"] == 2 and all(np.isfinite(summary["losses"]))
    before = flax.traverse_util.flatten_dict(jax.device_get(init), sep="/")
    after = flax.traverse_util.flatten_dict(jax.device_get(summary["final_params"]), sep="/")
    words = [k for k in before if k.startswith("qformer/embeddings/word_embeddings")]
    assert words and all(not np.array_equal(before[k], after[k]) for k in words)
    for k in before:
        if k.startswith(("vision_model/", "language_model/")):
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_synthetic_batches_have_instructions_and_dpo_is_refused(checkpoint):
    from mllm_jax.data.pipeline import LlavaPipeline
    c = _config(checkpoint)
    c.data.update(source="synthetic", text_len=8)
    batch = next(make_data(c, 0, 1))
    assert batch["qformer_input_ids"].shape == batch["qformer_attention_mask"].shape
    assert batch["qformer_input_ids"].max() < c.model.projector.vocab_size
    with pytest.raises(ValueError, match="lm objective"):
        LlavaPipeline([], None, None, "vicuna_v1", max_length=8, max_images=1,
                      image_tokens_per_image=4, mode="dpo",
                      sample_inputs=mllm_jax.models.registry.sample_inputs(
                          c.model, {"source": "synthetic"}))
    c.data.update(source="llava_json", qformer_tokenizer=str(checkpoint[0]) + "/nowhere")
    with pytest.raises(FileNotFoundError, match="data.qformer_tokenizer"):
        make_data(c, 0, 1)


def test_a_llava_model_with_an_instruction_aware_q_former(tmp_path):
    """A LLaVA-style model whose connector is an instructblip_qformer: the instruction is
    the user's text in the LLM's own tokenizer (no qformer_tokenizer/ beside it), batches
    and generation give it to the Q-Former, and it changes what the model says."""
    from mllm_jax import config as mc, presets
    from mllm_jax.data.image import ImageProcessorConfig
    from mllm_jax.data.tokenizer import load_tokenizer
    from mllm_jax.infer.batching import Conversation, encode_prompt, generate_all
    from mllm_jax.models import registry
    from mllm_jax.models.connectors.qformer import qformer_config
    from test_templates import make_hf
    tok_dir = make_hf(str(tmp_path / "tok"), "bytelevel")
    tok = load_tokenizer(tok_dir)
    vocab = tok.vocab_size
    vision = presets.tiny_clip()
    q = qformer_config(model_type="instructblip_qformer", num_query_tokens=4, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                       encoder_hidden_size=vision.hidden_size, vocab_size=vocab,
                       max_position_embeddings=24)
    cfg = mc.llava_config(vision=vision, text=presets.tiny_llama(vocab_size=vocab),
                          projector=q, image_token_index=tok.image_token_id)
    assert registry.sample_input_keys(cfg) == ("qformer_input_ids", "qformer_attention_mask")
    builder = registry.sample_inputs(cfg, {"tokenizer": tok_dir})
    messages = [{"from": "human", "value": "<image>\nwhat is left in the picture ?"}]
    want = tok.encode_with_special_tokens("what is left in the picture ?")
    assert list(builder.encode(messages, "s0")) == want and builder.max_length == 24

    model = mllm_jax.build_model(cfg)
    params = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0),
                                              *mllm_jax.models.init_inputs(cfg))["params"])
    rng = np.random.RandomState(0)
    image = str(tmp_path / "picture.png")
    Image.fromarray(rng.randint(0, 256, (28, 28, 3), np.uint8)).save(image)
    image_cfg = ImageProcessorConfig(mode="crop", size={"shortest_edge": 28}, crop_size=28)
    conversation = Conversation(messages, [image], "s0")
    ids = encode_prompt(model, tok, conversation, "chatml")[None]
    from mllm_jax.infer.batching import load_pixels
    pixels = np.stack(load_pixels(conversation, image_cfg))
    inputs = builder.collate([builder.encode(messages, "s0")], 1)

    def logits(**kw):
        return np.asarray(model.apply({"params": params}, ids, pixels, np.ones_like(ids),
                                      **kw))[0, -1]

    read = logits(**inputs)
    other = builder.collate([builder.encode([{"from": "human", "value": "a red square"}],
                                            "s1")], 1)
    assert np.abs(read - logits(**other)).max() > 1e-4
    (answer,) = generate_all(model, params, tok, image_cfg, [conversation], "chatml",
                             max_new_tokens=1, eos_token_id=-1)
    assert answer == tok.decode([int(np.argmax(read))]).strip()
