"""BLIP-2 stage 1: the three losses against hand computations, hard-negative sampling, the
attention masks of the three passes, ITC over a 1- and an 8-device mesh, trainer steps of
the objective, the image_text data mode, and the hand-over of the Q-Former to a stage-2
LLaVA model."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from mllm_jax import config as mc
from mllm_jax.models import blip2_qformer as B
from mllm_jax.models.connectors.qformer import QFormerModel, qformer_config
from mllm_jax.pretrain.contrastive import init_params
from mllm_jax.train import blip2_losses as L
from mllm_jax.train import recipe, step as step_lib

N_Q, VOCAB = 3, 20


def tiny_config():
    v = mc.vision_config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, image_size=16, patch_size=8)
    q = qformer_config(num_query_tokens=N_Q, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, cross_attention_frequency=1,
                       use_qformer_text_input=True, vocab_size=VOCAB, encoder_hidden_size=16,
                       max_position_embeddings=8, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6)
    return B.blip2_qformer_config(v, q, dec_token_id=VOCAB - 1, image_text_hidden_size=8,
                                  vision_feature_layer=-1)


@pytest.fixture(scope="module")
def model_and_params():
    cfg = tiny_config()
    model = B.Blip2QFormerPretraining(cfg)
    params = init_params(model, 0, *B.init_inputs(cfg), overrides={"temp": 0.07})
    params["ln_vision"]["scale"] = params["ln_vision"]["scale"] + 0.3  # not the identity
    return cfg, model, params


def _batch(b=4, t=6, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(1, VOCAB - 1, size=(b, t)), 0).astype(np.int32)
    return {"pixel_values": rng.standard_normal((b, 16, 16, 3)).astype(np.float32),
            "input_ids": ids, "attention_mask": mask,
            "image_ids": np.arange(b, dtype=np.int32)}


# ---- the losses by hand ----------------------------------------------------------------------

def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_itc_loss_by_hand():
    # Two queries per image; the similarity of (image i, text j) is the larger of the two
    # (image 2 with text 2: 0.8 for query 0, 0.96 for query 1).
    img = np.array([[[1, 0], [0, 1]], [[0.6, 0.8], [-1, 0]], [[0, -1], [0.8, -0.6]]],
                   np.float32)
    txt = np.array([[1, 0], [0, 1], [0.6, -0.8]], np.float32)
    per_query = np.einsum("iqe,te->itq", img, txt)
    sim = per_query.max(-1) / 0.1
    assert sim[1, 0] == pytest.approx(6.0) and sim[2, 2] == pytest.approx(9.6)
    eps, n = 0.1, 3
    target = (1 - eps) * np.eye(n) + eps / n
    want = (-(target * _log_softmax(sim)).sum(1).mean()
            - (target * _log_softmax(sim.T)).sum(1).mean()) / 2
    got, got_sim = L.itc_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(0.1))
    np.testing.assert_allclose(got_sim, sim, rtol=1e-6)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # Captions 0 and 1 of one image: each is a target of the other (half the mass each).
    ids = np.array([7, 7, 3])
    pos = (ids[:, None] == ids[None]).astype(np.float64)
    target = (1 - eps) * pos / pos.sum(1, keepdims=True) + eps / n
    want = (-(target * _log_softmax(sim)).sum(1).mean()
            - (target.T * _log_softmax(sim.T)).sum(1).mean()) / 2
    got, _ = L.itc_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(0.1), jnp.asarray(ids))
    assert float(got) == pytest.approx(want, rel=1e-6)
    # The temperature is clamped to [0.001, 0.5] in value, its gradient kept.
    _, s = L.itc_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(2.0))
    np.testing.assert_allclose(s, per_query.max(-1) / 0.5, rtol=1e-6)
    g = jax.grad(lambda t: L.itc_similarity(img, txt, t).sum())(jnp.float32(2.0))
    assert float(g) != 0.0


def test_itm_and_itg_losses_by_hand():
    logits = np.array([[0.0, 2.0], [1.0, -1.0], [0.5, 0.5], [3.0, 0.0], [0.0, 1.0],
                       [2.0, 2.5]], np.float32)
    labels = np.array([1, 1, 0, 0, 0, 0])
    nll = -_log_softmax(logits)[np.arange(6), labels]
    loss, acc = L.itm_loss(jnp.asarray(logits))
    assert float(loss) == pytest.approx(nll.mean(), rel=1e-6)
    assert float(acc) == pytest.approx(3 / 6)  # rows 0, 2 (a tie: class 0) and 3 are right
    valid = np.array([1, 1, 1, 0, 1, 1], bool)
    loss, _ = L.itm_loss(jnp.asarray(logits), jnp.asarray(valid))
    assert float(loss) == pytest.approx(nll[valid].mean(), rel=1e-6)

    rng = np.random.default_rng(1)
    lm = rng.standard_normal((2, 4, 5)).astype(np.float32)
    ids = np.array([[4, 1, 2, 0], [4, 3, 3, 1]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
    eps, terms = 0.1, []
    for b in range(2):
        for i in range(3):
            if mask[b, i + 1]:
                lp = _log_softmax(lm[b, i])
                terms.append((1 - eps) * -lp[ids[b, i + 1]] + eps * -lp.mean())
    loss, n = L.itg_loss(jnp.asarray(lm), jnp.asarray(ids), jnp.asarray(mask))
    assert int(n) == 5 and float(loss) == pytest.approx(np.mean(terms), rel=1e-6)


def test_hard_negatives_follow_the_weights_and_never_the_positive():
    # Row i's weights: softmax(sim[i]) + 1e-4 off its matches; 4000 draws per row.
    sim = np.log(np.array([[1, 6, 3, 1], [2, 1, 2, 4], [5, 3, 1, 2], [1, 1, 1, 1]],
                          np.float32))
    ids = np.array([0, 1, 2, 0])  # pairs 0 and 3 are captions of one image
    w = np.exp(sim) / np.exp(sim).sum(1, keepdims=True) + 1e-4
    w[ids[:, None] == ids[None]] = 0
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws, valid = jax.vmap(lambda k: L.sample_negatives(
        k, L.negative_weights(jnp.asarray(sim), jnp.asarray(ids))))(keys)
    draws = np.asarray(draws)
    assert np.asarray(valid).all()
    for i in range(4):
        assert not np.any(ids[draws[:, i]] == ids[i])  # never a match
        freq = np.bincount(draws[:, i], minlength=4) / len(keys)
        np.testing.assert_allclose(freq, w[i] / w[i].sum(), atol=0.03)
    # A row whose every column is a match has no negative: flagged, left out of ITM.
    _, ok = L.sample_negatives(jax.random.PRNGKey(1),
                               L.negative_weights(jnp.zeros((2, 2)), jnp.array([5, 5])))
    assert not np.asarray(ok).any()


# ---- the masks -------------------------------------------------------------------------------

def test_attention_masks():
    text = jnp.array([[1, 1, 1, 0]])
    itm = np.asarray(B.itm_attention_mask(2, text))
    np.testing.assert_array_equal(itm, [[1, 1, 1, 1, 1, 0]])
    itg = np.asarray(B.itg_attention_mask(2, text))[0].astype(int)
    want = np.array([[1, 1, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0, 0],
                     [1, 1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 1, 0],
                     [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(itg, want)


def test_passes_see_what_their_masks_allow(model_and_params):
    cfg, model, params = model_and_params
    b = _batch(2)
    ids, mask = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
    apply = lambda method, *a: model.apply({"params": params}, *a, method=method)  # noqa: E731
    emb = apply("image_embeds", b["pixel_values"])
    other = apply("image_embeds", b["pixel_values"][::-1])
    # ITC: the text pass does not see the image, the query pass does not see the text.
    img, txt = apply("itc_features", emb, ids, mask)
    img2, txt2 = apply("itc_features", other, (ids + 1) % (VOCAB - 1), mask)
    np.testing.assert_allclose(txt, apply("itc_features", other, ids, mask)[1], atol=1e-6)
    np.testing.assert_allclose(img, apply("itc_features", emb, ids + 1, mask)[0], atol=1e-6)
    assert np.abs(np.asarray(img) - np.asarray(img2)).max() > 1e-3
    # ITM: queries and text see each other (bidirectional): changing the last real token
    # changes the query outputs and so the logits.
    last = mask.sum(1) - 1
    changed = ids.at[jnp.arange(2), last].set((ids[jnp.arange(2), last] + 3) % (VOCAB - 1))
    itm = apply("itm_logits", emb, ids, mask)
    assert np.abs(np.asarray(itm - apply("itm_logits", emb, changed, mask))).max() > 1e-6
    # ITG: the query rows equal the query-only pass (queries see queries only), and text
    # position i depends on no later token.
    x = jnp.concatenate([jnp.broadcast_to(params["query_tokens"], (2, N_Q, 16)),
                         model.apply({"params": params}, ids.at[:, 0].set(cfg.dec_token_id),
                                     method=lambda m, i: m.embeddings(i))], axis=1)
    full = QFormerModel(cfg.qformer).apply(
        {"params": params["qformer"]}, x, emb,
        attention_mask=B.itg_attention_mask(N_Q, mask), query_length=N_Q)
    np.testing.assert_allclose(full[:, :N_Q], apply("query_features", emb), atol=1e-5)
    h = apply("itg_hidden", emb, ids, mask)
    np.testing.assert_allclose(h, full[:, N_Q:], atol=1e-6)
    h2 = apply("itg_hidden", emb, changed, mask)
    for r in range(2):
        k = int(last[r])
        np.testing.assert_allclose(h[r, :k], h2[r, :k], atol=1e-6)
        assert np.abs(np.asarray(h[r, k] - h2[r, k])).max() > 1e-4


# ---- ITC over the mesh -------------------------------------------------------------------------

def test_itc_loss_and_gradients_equal_on_1_and_8_devices():
    rng = np.random.default_rng(3)
    n, q, d, e = 8, 3, 6, 4
    x_img = rng.standard_normal((n, q, d)).astype(np.float32)
    x_txt = rng.standard_normal((n, d)).astype(np.float32)
    params = {"wi": rng.standard_normal((d, e)).astype(np.float32),
              "wt": rng.standard_normal((d, e)).astype(np.float32), "temp": np.float32(0.07)}
    ids = np.array([0, 1, 2, 3, 4, 5, 6, 0], np.int32)

    def loss(p, xi, xt, i):
        img = xi @ p["wi"]
        txt = xt @ p["wt"]
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        return L.itc_loss(img, txt, p["temp"], i)[0]

    def run(devices):
        mesh = Mesh(np.asarray(devices).reshape(-1), ("data",))
        rows = NamedSharding(mesh, P("data"))
        f = jax.jit(jax.value_and_grad(loss), in_shardings=(
            NamedSharding(mesh, P()), rows, rows, rows))
        return jax.device_get(f(params, x_img, x_txt, ids))

    assert len(jax.devices()) == 8
    (l1, g1), (l8, g8) = run(jax.devices()[:1]), run(jax.devices())
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    for k in g1:
        np.testing.assert_allclose(g8[k], g1[k], rtol=1e-5, atol=1e-7)
    # Negatives only within each device's own pair (no gathering) would be another loss.
    local = np.mean([loss(params, x_img[k:k + 1], x_txt[k:k + 1], ids[k:k + 1])
                     for k in range(n)])
    assert abs(float(local) - float(l1)) > 0.1


# ---- the train step -----------------------------------------------------------------------------

def test_step_rng_is_a_function_of_the_state():
    import optax

    def objective(model, params, batch, extra, rng):
        noise = jax.random.normal(rng, params["w"].shape)
        return jnp.sum(params["w"] * noise), jnp.int32(1), {}

    tx = optax.sgd(0.1)
    step = jax.jit(step_lib.make_train_step(None, objective, tx, uses_rng=True,
                                            project=lambda p: {"w": jnp.clip(p["w"], -1, 1)}))
    state = step_lib.init_state({"w": jnp.zeros(3)}, tx, jax.random.PRNGKey(0))
    a, _ = step(state, {}, {}, {})
    b, _ = step(state, {}, {}, {})
    np.testing.assert_array_equal(a.params["w"], b.params["w"])  # same state, same draw
    c, _ = step(a, {}, {}, {})
    assert not np.allclose(c.params["w"] - a.params["w"], a.params["w"])  # a new draw
    big = step_lib.init_state({"w": jnp.full(3, 5.0)}, tx, jax.random.PRNGKey(0))
    assert np.abs(np.asarray(step(big, {}, {}, {})[0].params["w"])).max() <= 1.0



def test_dropout_masks_are_a_function_of_the_step_rng(model_and_params):
    """With dropout on, the loss is the same for the same step RNG, another for another RNG,
    and differs from the deterministic loss; the masks come from an "rbg" key."""
    from mllm_jax.train.blip2_stage1 import dropout_key, stage1_loss
    _, _, params = model_and_params
    cfg = tiny_config()
    cfg.qformer.update(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = B.Blip2QFormerPretraining(cfg)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    loss = jax.jit(lambda rng, dropout: stage1_loss(model, params, batch, rng,
                                                    dropout=dropout)[0],
                   static_argnums=1)
    k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    a, b, c, det = loss(k0, True), loss(k0, True), loss(k1, True), loss(k0, False)
    assert float(a) == float(b)
    assert float(a) != float(c) and float(a) != float(det)
    assert str(jax.random.key_impl(dropout_key(k0))) == "rbg"

def _train_config():
    c = recipe.base("tiny-llava")
    c.model = tiny_config()
    c.stage.update(trainable=[r"^(?!vision_model/)"], objective="blip2_stage1")
    c.train.update(global_batch_size=8, num_steps=8, lr=2e-3, warmup_ratio=0.0,
                   weight_decay=0.05, b2=0.98)
    c.data.update(source="synthetic", text_len=6, images=1, distinct_batches=1)
    return c


def test_trainer_steps_decrease_the_loss(model_and_params):
    from mllm_jax.data.sources import make_data
    from mllm_jax.train import validate
    from mllm_jax.train.loop import build_trainer
    cfg, _, params = model_and_params
    c = _train_config()
    validate.check(c)
    trainer = build_trainer(c, params=params)
    data = make_data(c, 0, 1)
    local = next(data)
    assert local["pixel_values"].shape == (8, 16, 16, 3) and local["image_ids"].shape == (8,)
    step = trainer.jit_step(local)
    state, losses = trainer.state, []
    vision_before = jax.device_get(trainer.frozen["vision_model"])
    with trainer.context():
        for _ in range(6):
            state, m = step(state, trainer.frozen, trainer.frozen_extra,
                            trainer.global_batch(local))
            m = jax.device_get(m)
            losses.append(float(m["loss"]))
    assert set(m) >= {"loss_itc", "loss_itm", "loss_itg", "itm_accuracy", "temp"}
    assert float(m["loss"]) == pytest.approx(m["loss_itc"] + m["loss_itm"] + m["loss_itg"],
                                             rel=1e-5)
    assert losses[-1] < losses[0] - 0.1, losses
    assert 0.001 <= float(state.params["temp"]) <= 0.5
    jax.tree_util.tree_map(np.testing.assert_array_equal, vision_before,
                           jax.device_get(trainer.frozen["vision_model"]))


def test_config_checks():
    from mllm_jax.train import validate
    c = _train_config()
    c.data.images = 2
    with pytest.raises(validate.ConfigError, match="data.images = 2"):
        validate.check(c)
    cfg = tiny_config()
    cfg.qformer.encoder_hidden_size = 24
    with pytest.raises(ValueError, match="encoder_hidden_size = 24"):
        B.check(cfg)


# ---- data --------------------------------------------------------------------------------------

class _Tok:
    source = "test"
    special_tokens = {"[CLS]": 101, "[SEP]": 102}
    bos_id = eos_id = None
    pad_id = 0
    image_token_id = None

    def encode(self, text, add_bos=False):
        return [ord(ch) for ch in text]


class _SmallTok(_Tok):
    """Ids inside the tiny model's vocabulary."""
    special_tokens = {"[CLS]": 11, "[SEP]": 12}

    def encode(self, text, add_bos=False):
        return [ord(ch) % 10 + 1 for ch in text]


def test_image_text_pipeline(tmp_path):
    import json

    from mllm_jax.data import image as image_lib
    from mllm_jax.data import pairs
    from mllm_jax.data.pipeline import LlavaPipeline
    for k in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
    entries = [{"id": "a", "image": "0.png", "caption": "red"},
               {"id": "b", "image": "1.png", "caption": "a long blue caption"},
               {"id": "c", "image": "0.png", "caption": "round"},
               {"id": "d", "image": "2.png", "conversations": [
                   {"from": "human", "value": "<image>\nDescribe."},
                   {"from": "gpt", "value": "green"}]},
               {"id": "e", "image": "2.png", "conversations": [
                   {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"},
                   {"from": "human", "value": "?"}, {"from": "gpt", "value": "y"}]}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(entries))
    records = pairs.read_caption_records(path)
    cfg = image_lib.ImageProcessorConfig(mode="crop", size={"shortest_edge": 16}, crop_size=16)
    pipe = LlavaPipeline(records, _Tok(), cfg, "vicuna_v1", global_batch_size=4,
                         max_length=8, max_images=1, image_tokens_per_image=0, num_workers=0,
                         mode="image_text", return_sample_ids=True, workdir=tmp_path / "w")
    b = next(pipe)
    order = list(b["sample_ids"])
    assert sorted(order) == ["a", "b", "c", "d"]  # "e" has two answers: reported, skipped
    assert pipe.report() == {"malformed_conversation": 1}
    assert b["pixel_values"].shape == (4, 16, 16, 3)
    row = order.index("b")
    assert list(b["input_ids"][row]) == [101] + [ord(c) for c in "a long"] + [102]
    assert b["attention_mask"][row].sum() == 8
    row = order.index("d")
    assert list(b["input_ids"][row][:7]) == [101] + [ord(c) for c in "green"] + [102]
    ids = dict(zip(order, b["image_ids"]))
    assert ids["a"] == ids["c"] and len({ids["a"], ids["b"], ids["d"]}) == 3


# ---- the hand-over to stage 2 ------------------------------------------------------------------

def test_copy_into_a_llava_qformer_gives_the_same_qformer(model_and_params):
    from mllm_jax.convert.hf_io import abstract_params
    from mllm_jax.models import build_model
    cfg, model, params = model_and_params
    q = ml_collections.ConfigDict(cfg.qformer.to_dict())
    q.update(type="qformer", use_qformer_text_input=False)
    llava = mc.llava_config(vision=cfg.vision, text=mc.text_config(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8), projector=q,
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    stage2 = build_model(llava)
    dst = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype),
                                 abstract_params(stage2))
    with pytest.raises(ValueError, match="ln_vision"):
        B.copy_qformer(params, dst)
    no_ln = {k: v for k, v in params.items() if k != "ln_vision"}
    got = B.copy_qformer(no_ln, dst)
    assert "intermediate" not in got["multi_modal_projector"]["qformer"]["encoder"]["layer_0"]
    emb = model.apply({"params": params}, _batch(2)["pixel_values"], method="image_embeds")
    want = model.apply({"params": params}, emb, method="query_features")
    proj = got["multi_modal_projector"]["language_projection"]
    out = stage2.apply({"params": got}, emb, method="project")
    np.testing.assert_allclose(out, want @ proj["kernel"] + proj["bias"], atol=1e-5)
    bad = dict(no_ln, query_tokens=np.zeros((1, N_Q + 1, 16), np.float32))
    with pytest.raises(ValueError, match="query_tokens"):
        B.copy_qformer(bad, dst)
    # An instruction-aware Q-Former takes the text embeddings and the shared LayerNorm too,
    # as LAVIS initialises InstructBLIP from BLIP-2.
    llava.projector.model_type = "instructblip_qformer"
    dst = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype),
                                 abstract_params(build_model(llava)))
    got = B.copy_qformer(no_ln, dst)["multi_modal_projector"]["qformer"]
    for name, src in (("word_embeddings", no_ln["embeddings"]["word_embeddings"]),
                      ("position_embeddings", no_ln["embeddings"]["position_embeddings"]),
                      ("layernorm", no_ln["qformer"]["layernorm"])):
        jax.tree_util.tree_map(np.testing.assert_array_equal, got["embeddings"][name], src)
    np.testing.assert_array_equal(got["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"],
                                  no_ln["qformer"]["encoder"]["layer_0"]["intermediate"]["dense"]
                                  ["kernel"])


# ---- retrieval ---------------------------------------------------------------------------------

def test_retrieval_metrics_by_hand():
    from mllm_jax.pretrain.blip2_retrieval import retrieval_metrics
    # Image 0 and 1 show caption 0, image 2 caption 1; one query of image 2 points at
    # caption 0 less than its other query points at caption 1.
    img = np.array([[[1, 0], [0, 0]], [[0, 1], [0.9, 0.1]], [[0.5, 0], [0, 0.8]]], np.float32)
    txt = np.array([[1, 0], [0, 1]], np.float32)
    m = retrieval_metrics(img, txt, [0, 0, 1], ["a", "b"])
    # i2t: image 0 -> a (hit), image 1 -> b (0.9 < 1.0: miss), image 2 -> b (hit).
    assert m["i2t_r1"] == pytest.approx(2 / 3) and m["i2t_chance"] == 0.5
    # t2i: a -> image 0 (hit), b -> image 1 (1.0 > 0.8: miss).
    assert m["t2i_r1"] == 0.5 and m["t2i_chance"] == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_retrieval_of_a_model(tmp_path, model_and_params):
    import json

    from mllm_jax.pretrain.blip2_retrieval import retrieval_r1
    _, model, params = model_and_params
    entries = []
    for k in range(3):
        Image.fromarray(np.full((20, 20, 3), 60 * k, np.uint8)).save(tmp_path / f"{k}.png")
        entries.append({"id": str(k), "image": f"{k}.png", "caption": "ab"[k % 2]})
    (tmp_path / "val.json").write_text(json.dumps(entries))
    m = retrieval_r1(model, params, str(tmp_path / "val.json"), _SmallTok(),
                     max_length=4)
    assert m["images"] == 3 and m["captions"] == 2 and m["i2t_chance"] == 0.5
    assert 0 <= m["i2t_r1"] <= 1 and m["i2t_r1"] * 3 == round(m["i2t_r1"] * 3)


# ---- initialisation from BERT ------------------------------------------------------------------

def test_qformer_from_bert_matches_transformers(model_and_params):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from mllm_jax.models.blip2_qformer_bert import from_bert
    cfg, model, params = model_and_params
    torch.manual_seed(0)
    hf = BertForMaskedLM(BertConfig(vocab_size=VOCAB - 1, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32,
                                    max_position_embeddings=8, layer_norm_eps=1e-6,
                                    hidden_act="gelu")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
        # LAVIS's BERT embeddings have no token types: with zero type embeddings the two
        # compute the same.
        hf.bert.embeddings.token_type_embeddings.weight.zero_()
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    got = from_bert(params, state)
    layer = got["qformer"]["encoder"]["layer_0"]
    np.testing.assert_array_equal(layer["intermediate_query"]["dense"]["kernel"],
                                  layer["intermediate"]["dense"]["kernel"])
    np.testing.assert_array_equal(got["embeddings"]["word_embeddings"]["embedding"][-1],
                                  params["embeddings"]["word_embeddings"]["embedding"][-1])
    b = _batch(2)
    with torch.no_grad():
        out = hf.bert(torch.from_numpy(b["input_ids"]).long(),
                      attention_mask=torch.from_numpy(b["attention_mask"]).long())
        want_h = out.last_hidden_state
        want_logits = hf.cls(want_h)
    h = model.apply({"params": got}, b["input_ids"], b["attention_mask"],
                    method="text_features")
    valid = b["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(h)[valid], want_h.numpy()[valid], atol=1e-5)
    logits = model.apply({"params": got}, jnp.asarray(want_h.numpy()), method="lm_logits")
    np.testing.assert_allclose(np.asarray(logits)[..., :VOCAB - 1], want_logits.numpy(),
                               atol=1e-4)
    with pytest.raises(ValueError, match="not mapped"):
        from_bert(params, {**state, "bert.encoder.layer.0.extra.weight": np.zeros(2)})


def test_data_source_reads_a_pairs_file_for_the_objective(tmp_path):
    import json

    from test_templates import make_hf

    from mllm_jax.data.sources import make_data
    from mllm_jax.data.tokenizer import load_tokenizer
    for k in range(4):
        Image.fromarray(np.full((20, 20, 3), 50 * k, np.uint8)).save(tmp_path / f"{k}.png")
    (tmp_path / "pairs.json").write_text(json.dumps(
        [{"id": str(k), "image": f"{k}.png", "caption": f"a shape number {k}"}
         for k in range(4)]))
    tok_dir = make_hf(str(tmp_path / "tok"), "bytelevel")
    c = _train_config()
    c.data.update(source="llava_json", json=str(tmp_path / "pairs.json"), tokenizer=tok_dir,
                  max_length=8, workers=0)
    c.train.global_batch_size = 4
    batch = next(make_data(c, 0, 1, str(tmp_path / "work")))
    assert sorted(batch) == ["attention_mask", "image_ids", "input_ids", "pixel_values"]
    assert batch["pixel_values"].shape == (4, 16, 16, 3)
    tok = load_tokenizer(tok_dir)
    ids = batch["input_ids"]
    assert (ids[:, 0] == tok.bos_id).all()
    ends = batch["attention_mask"].sum(1) - 1
    assert (ids[np.arange(4), ends] == tok.eos_id).all()
    assert sorted(batch["image_ids"]) == [0, 1, 2, 3]
