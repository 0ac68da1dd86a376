"""SigLIP (`vision.type = "siglip"`): parity with transformers' SiglipVisionModel (attention
pooling head, interpolated positions at another size, partial patches dropped), SigLIP
towers under LlavaForConditionalGeneration (logits for both feature strategies, greedy
generation), bitwise HF round trips, the presets' parameters against meta-device models, and
the sigmoid contrastive loss against HF's SiglipModel(return_loss=True) and under a mesh.

Tiny configs with non-default settings: 32 px images of 8 px patches (4x4 positions),
LayerNorm eps 1e-5, every bias (the packed in-projection's too) and norm scale random."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from transformers import (LlavaConfig, LlavaForConditionalGeneration, SiglipConfig,
                          SiglipModel, SiglipVisionConfig, SiglipVisionModel)

import hf_factories as hf
import mllm_jax
from mllm_jax import presets
from mllm_jax.convert import hf_config, hf_io, hf_keys
from mllm_jax.infer import generate as gen
from mllm_jax.models.encoders import siglip
from mllm_jax.pretrain import contrastive
from mllm_jax.pretrain.sigmoid_loss import (SIGMOID_BIAS_INIT, SIGMOID_SCALE_INIT,
                                            sigmoid_logits, sigmoid_loss)
from test_generate import EOS, INIT, NEW, PAD, hf_generate, llava_prompts

ATOL = 1e-4
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            image_size=32, patch_size=8, layer_norm_eps=1e-5)
ERRORS = {}  # case -> max abs error, printed at module teardown


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    if ERRORS:
        print("\nmax |jax - torch| per case:")
        for case, err in sorted(ERRORS.items()):
            print(f"  {case:<32}  {err:.3e}")


def assert_close(case, ours, ref, valid=None):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (case, ours.shape, ref.shape)
    diff = np.abs(ours - ref)
    err = float((diff if valid is None else diff[np.asarray(valid, bool)]).max())
    ERRORS[case] = max(err, ERRORS.get(case, 0.0))
    assert err <= ATOL, f"{case}: max abs error {err:.3e}"


@torch.no_grad()
def randomize_(model, seed):
    """hf_factories' random biases and norm scales, plus the parameters HF starts at zero
    that are not named `bias` (the head's in_proj_bias, SiglipModel's logit scale/bias)."""
    hf.randomize_extras_(model, seed=seed)
    gen_ = torch.Generator().manual_seed(seed + 100)
    for name, p in model.named_parameters():
        if name.endswith(("in_proj_bias", "logit_scale", "logit_bias")):
            p.copy_(torch.randn(p.shape, generator=gen_) * 0.5)
    return model.eval()


def nchw(nhwc):
    return torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)))


def assert_loads_back_bitwise(cls, directory, reference):
    back, info = cls.from_pretrained(directory, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = reference.state_dict()
    got = back.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref), \
        [k for k in ref if not torch.equal(got[k], ref[k])]


# ---- the tower on its own -------------------------------------------------------------------

@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_(SiglipVisionModel(SiglipVisionConfig(**TINY)), seed=1)
    path = hf.save(model, tmp_path_factory.mktemp("siglip_vision"))
    ours, params = mllm_jax.load_hf(path)
    return model, path, ours, params


@pytest.mark.parametrize("hw", [(32, 32), (44, 60)], ids=["native", "44x60"])
def test_vision_model_matches_transformers(vision, hw):
    """hidden_states, last_hidden_state (post-LayerNormed) and the attention-pooled
    pooler_output. 44x60 px: a 5x7 grid (the conv drops 4 px of each side) with the 4x4
    position grid resized bicubically, as HF's interpolate_pos_encoding=True."""
    model, _, ours, params = vision
    assert ours.cfg.model_type == "siglip_vision" and ours.cfg.vision.type == "siglip"
    x = np.random.RandomState(3).standard_normal((2, *hw, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=nchw(x), output_hidden_states=True,
                    interpolate_pos_encoding=hw != (32, 32))
    out = jax.jit(ours.apply)({"params": params}, jnp.asarray(x))
    case = f"vision-{hw[0]}x{hw[1]}"
    assert out["last_hidden_state"].shape == (2, (hw[0] // 8) * (hw[1] // 8), 32)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 4
    for a, b in zip(out["hidden_states"], ref.hidden_states):
        assert_close(case, a, b.numpy())
    assert_close(case, out["last_hidden_state"], ref.last_hidden_state.numpy())
    assert_close(case, out["pooler_output"], ref.pooler_output.numpy())


def test_vision_parameters_are_hf_names_with_axes(vision):
    _, _, ours, params = vision
    flat = flax.traverse_util.flatten_dict(params)
    names = {hf_keys.hf_name(p) for p in flat}
    for key in ("vision_model.embeddings.patch_embedding.weight",
                "vision_model.encoder.layers.2.self_attn.q_proj.weight",
                "vision_model.post_layernorm.weight", "vision_model.head.probe",
                "vision_model.head.attention.in_proj_weight",
                "vision_model.head.attention.in_proj_bias",
                "vision_model.head.attention.out_proj.weight", "vision_model.head.mlp.fc2.bias"):
        assert key in names, key
    head = params["vision_model"]["head"]["attention"]
    assert head["in_proj_weight"].shape == (96, 32) and head["in_proj_bias"].shape == (96,)
    boxed = flax.traverse_util.flatten_dict(hf_io.abstract_params(ours, boxed=True))
    unannotated = [p for p, leaf in boxed.items() if not isinstance(leaf, flax.linen.Partitioned)]
    assert unannotated == []


def test_vision_save_hf_round_trip(vision, tmp_path):
    model, _, ours, params = vision
    mllm_jax.save_hf(ours, params, tmp_path / "out")
    assert_loads_back_bitwise(SiglipVisionModel, tmp_path / "out", model)


def test_vision_without_head():
    """vision_use_head=False: no head parameters, pooler_output None, the key set of HF's."""
    cfg = hf_config.from_hf({"model_type": "siglip_vision_model", "vision_use_head": False,
                             **TINY})
    model = mllm_jax.build_model(cfg)
    expected, _ = hf_io._expected(model)
    with torch.device("meta"):
        theirs = SiglipVisionModel(SiglipVisionConfig(vision_use_head=False, **TINY))
    assert set(expected) == {hf_keys.canonical_key(k, cfg.model_type)
                             for k in theirs.state_dict()}
    out = jax.eval_shape(model.apply, {"params": hf_io.abstract_params(model)},
                         jnp.zeros((1, 32, 32, 3)))
    assert out["pooler_output"] is None


def test_config_round_trip_and_checks():
    v = siglip.vision_from_hf({"model_type": "siglip_vision_model", **TINY})
    assert v.hidden_act == "gelu_pytorch_tanh" and v.vision_use_head is True
    assert siglip.vision_to_hf(v) == {"model_type": "siglip_vision_model",
                                      **siglip.VISION_DEFAULTS, **TINY}
    with pytest.raises(mllm_jax.models.UnsupportedModelError, match="not SigLIP"):
        siglip.vision_from_hf({"model_type": "clip_vision_model"})
    with pytest.raises(mllm_jax.models.registry.InvalidConfigError, match="vision_use_head"):
        siglip.vision_from_hf({"vision_use_head": "yes"})


# ---- SiglipModel: its image tower, and the sigmoid loss --------------------------------------

@pytest.fixture(scope="module")
def siglip_pair(tmp_path_factory):
    torch.manual_seed(4)
    config = SiglipConfig(
        vision_config=TINY,
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16))
    model = randomize_(SiglipModel(config), seed=5)
    return model, hf.save(model, tmp_path_factory.mktemp("siglip"))


def numpy_sigmoid_loss(logits):
    """HF SiglipModel.forward's loss, transcribed: -sum over texts' rows of
    logsigmoid(m1_diag1 * logits), mean over the rows."""
    n = logits.shape[0]
    m1_diag1 = -np.ones_like(logits) + 2 * np.eye(n)
    z = m1_diag1 * logits
    loglik = -np.logaddexp(0.0, -z)
    return float(np.mean(-np.sum(loglik, axis=-1)))


def test_sigmoid_loss_equals_siglip_model_loss(siglip_pair):
    """Our loss on HF's normalised embeddings, logit_scale and logit_bias is HF's
    return_loss=True loss; with our own image tower's pooled outputs (SiglipModel's
    directory read by load_hf as a SigLIP vision model) as well."""
    model, path = siglip_pair
    n = 6
    rs = np.random.RandomState(6)
    x = rs.standard_normal((n, 32, 32, 3)).astype(np.float32)
    ids = torch.from_numpy(rs.randint(2, 64, (n, 16)))
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=nchw(x), return_loss=True)
    scale, bias = float(model.logit_scale.detach()), float(model.logit_bias.detach())
    img, txt = out.image_embeds.numpy(), out.text_embeds.numpy()
    logits = sigmoid_logits(jnp.asarray(img), jnp.asarray(txt), scale, bias)
    assert_close("siglip-logits", logits, out.logits_per_image.numpy())
    ref = float(out.loss)
    assert abs(float(sigmoid_loss(logits)) - ref) <= 1e-5 * max(1.0, abs(ref))
    assert abs(numpy_sigmoid_loss(out.logits_per_text.numpy()) - ref) <= 1e-5 * max(1.0, ref)

    tower, params = mllm_jax.load_hf(path)  # the text tower and logit scale/bias are skipped
    assert tower.cfg.model_type == "siglip_vision"
    pooled = jax.jit(tower.apply)({"params": params}, jnp.asarray(x))["pooler_output"]
    assert_close("siglip-model-pooled", pooled, out.vision_model_output.pooler_output.numpy())
    ours = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    loss = float(sigmoid_loss(sigmoid_logits(ours, jnp.asarray(txt), scale, bias)))
    assert abs(loss - ref) <= 1e-4 * max(1.0, ref)


def test_sigmoid_loss_sharded_equals_unsharded():
    """Batch split over an 8-device `data` axis: the loss and its gradients are the
    one-device ones."""
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8
    mesh = Mesh(devices, ("data",))
    rs = np.random.RandomState(7)
    img, txt = (rs.standard_normal((32, 16)).astype(np.float32) for _ in range(2))
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    txt[:16] = 0.8 * img[:16] + 0.2 * txt[:16]  # some matched pairs score high

    def loss(img, txt, scale, bias):
        return sigmoid_loss(sigmoid_logits(img, txt, scale, bias))

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    args = (img, txt, jnp.float32(SIGMOID_SCALE_INIT), jnp.float32(SIGMOID_BIAS_INIT))
    ref_loss, ref_grads = jax.jit(fn)(*args)
    split = NamedSharding(mesh, P("data", None))
    sharded = [jax.device_put(a, split) for a in args[:2]] + list(args[2:])
    got_loss, got_grads = jax.jit(fn)(*sharded)
    assert len(got_grads[0].sharding.device_set) == 8
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    for a, b in zip(got_grads, ref_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert abs(float(ref_loss) - numpy_sigmoid_loss(
        np.asarray(sigmoid_logits(img, txt, *args[2:])))) <= 1e-5 * float(ref_loss)


def test_contrastive_model_with_the_sigmoid_loss():
    """ContrastiveModel(loss="sigmoid"): a logit_bias parameter, SigLIP's initial scale and
    bias, logits exp(scale) * cosine + bias, and the sigmoid loss as its objective."""
    vcfg = contrastive.vision_model_config(16, 8, hidden_size=16, num_layers=1, num_heads=2)
    tcfg = contrastive.text_tower_config(32, hidden_size=16, num_layers=1, num_heads=2)
    model = contrastive.ContrastiveModel(vcfg, tcfg, embed_dim=8, loss="sigmoid")
    x = jnp.asarray(np.random.RandomState(8).standard_normal((3, 16, 16, 3)), jnp.float32)
    ids, eos = jnp.ones((3, 5), jnp.int32), jnp.array([4, 2, 3])
    params = contrastive.init_params(model, 0, x, ids, eos)
    assert float(params["logit_scale"]) == pytest.approx(SIGMOID_SCALE_INIT)
    assert float(params["logit_bias"]) == SIGMOID_BIAS_INIT
    logits, img, txt = jax.jit(lambda p: model.apply(
        {"params": p}, x, ids, eos,
        method=lambda m, x, i, e: (m(x, i, e), m.encode_image(x), m.encode_text(i, e))))(params)
    np.testing.assert_allclose(logits, 10.0 * img @ txt.T - 10.0, rtol=1e-5, atol=1e-5)
    assert contrastive.LOSSES["sigmoid"] is sigmoid_loss
    softmax = contrastive.ContrastiveModel(vcfg, tcfg, embed_dim=8)
    assert "logit_bias" not in contrastive.init_params(softmax, 0, x, ids, eos)
    with pytest.raises(ValueError, match="sigmoid"):
        contrastive.pretrain_contrastive([], None, loss="hinge")


# ---- SigLIP under LLaVA -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def llava_siglip(tmp_path_factory):
    torch.manual_seed(9)
    grid = (TINY["image_size"] // TINY["patch_size"]) ** 2
    text = hf.text_config("llama", initializer_range=INIT)
    config = LlavaConfig(vision_config=SiglipVisionConfig(**TINY), text_config=text,
                         image_token_index=text.vocab_size - 1, image_seq_length=grid - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = randomize_(LlavaForConditionalGeneration(config), seed=10)
    path = hf.save(model, tmp_path_factory.mktemp("llava_siglip"))
    ref = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    ours, params = mllm_jax.load_hf(path)
    return ref, path, ours, params


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_siglip_logits(llava_siglip, strategy):
    """HF's LLaVA crops the first token under `default` whatever the tower: 15 of a SigLIP
    image's 16 patches; `full` keeps 16."""
    ref, path, ours, params = llava_siglip
    if strategy == "full":
        ours, params = mllm_jax.load_hf(path, vision_feature_select_strategy="full")
    n = mllm_jax.models.tokens_per_image(ours.cfg)
    assert n == (16 if strategy == "full" else 15)
    config = ref.config
    rs = np.random.RandomState(11)
    img = [config.image_token_index] * n
    text = lambda k: list(rs.randint(3, hf.TEXT_DEFAULTS["vocab_size"] - 1, k))  # noqa: E731
    samples = [[1] + text(3) + img + text(2) + img + text(4), [1] + text(2) + img + text(3)]
    s = max(map(len, samples))
    ids = np.full((2, s), PAD, np.int64)
    mask = np.zeros((2, s), np.int64)
    for i, x in enumerate(samples):
        ids[i, s - len(x):], mask[i, s - len(x):] = x, 1
    nhwc, pixels = hf.random_pixels(3, 32, seed=12)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   pixel_values=pixels, vision_feature_select_strategy=strategy).logits
    got = jax.jit(ours.apply)({"params": params}, jnp.asarray(ids, jnp.int32),
                              pixel_values=jnp.asarray(nhwc),
                              attention_mask=jnp.asarray(mask, jnp.int32))
    assert_close(f"llava-siglip-{strategy}", got, want.numpy(), valid=mask)


def test_llava_siglip_greedy_matches_hf(llava_siglip):
    ref, _, ours, params = llava_siglip
    ids, mask, nhwc, pixels = llava_prompts(ref.config, seed=13)
    expected = hf_generate(ref, ids, mask, pixel_values=pixels)
    assert len(set(expected[0].tolist())) > NEW // 2, expected
    got = gen.generate(ours, params, ids, mask, pixel_values=nhwc, max_new_tokens=NEW,
                       eos_token_id=EOS, pad_token_id=PAD)
    np.testing.assert_array_equal(got, expected)


def test_llava_siglip_save_hf_round_trip(llava_siglip, tmp_path):
    ref, _, ours, params = llava_siglip
    assert ours.cfg.vision.type == "siglip"
    assert "head" in params["vision_tower"]["vision_model"]  # kept, though LLaVA never reads it
    mllm_jax.save_hf(ours, params, tmp_path / "out")
    assert_loads_back_bitwise(LlavaForConditionalGeneration, tmp_path / "out", ref)


# ---- presets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,billions,tokens", [("siglip-so400m-patch14-384", 0.428, 729),
                                                  ("siglip-base-patch16-224", 0.093, 196)])
def test_presets_match_transformers_meta_models(name, billions, tokens):
    cfg = presets.get(name)
    model = mllm_jax.build_model(cfg)
    expected, flat = hf_io._expected(model)
    with torch.device("meta"):
        theirs = SiglipVisionModel(SiglipVisionConfig(**hf_config.to_hf(cfg)))
    n_ours = sum(int(np.prod(leaf.shape)) for leaf in flat.values())
    assert n_ours == sum(p.numel() for p in theirs.parameters())
    assert abs(n_ours / 1e9 - billions) < 0.01 * billions, n_ours
    shapes = {hf_keys.canonical_key(k, cfg.model_type): tuple(v.shape)
              for k, v in theirs.state_dict().items()}
    assert shapes == {k: tuple(shape) for k, (_, _, shape) in expected.items()}
    # so400m/14 at 384 px: 27x27 patches (the conv drops the last 6 px of each side).
    llava = mllm_jax.config.llava_config(vision=cfg.vision, vision_feature_select_strategy="full")
    assert siglip.tokens_per_image(llava) == tokens
