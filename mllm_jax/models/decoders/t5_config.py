"""T5's text config: the fields, their checks, the HF `T5Config` mapping and the FLOP count.

Our field names are the ones `T5Config.attribute_map` also answers to (`hidden_size` =
d_model, `num_attention_heads` = num_heads, `num_hidden_layers` = num_layers, `head_dim` =
d_kv) plus `intermediate_size` (d_ff); the rest keep HF's spelling. HF writes only the
fields that differ from `T5Config`'s defaults, so the defaults below are transformers'
(tests check them against the installed transformers).

The output head: original T5 ties it to the shared embeddings and scales the decoder output
by d_model ** -0.5 first; T5 v1.1 and Flan-T5 have their own `lm_head` and no scaling.
A config.json written before transformers 5 says which with `tie_word_embeddings`. Since
transformers 5, `T5Config` always writes `tie_word_embeddings: true` and says
`scale_decoder_outputs` instead, and whether `lm_head.weight` is its own tensor shows only
in the checkpoint (HF unties it when it is stored and differs); such a config is read as
tied exactly when its decoder outputs are scaled, as every published T5 is.
"""
import ml_collections

from mllm_jax.models import checks
from mllm_jax.models.layers import ACTIVATIONS
from mllm_jax.models.registry import InvalidConfigError

HF_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                   num_decoder_layers=None, num_heads=8, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                   feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=None)

# ours <- HF's
HF_NAMES = dict(vocab_size="vocab_size", hidden_size="d_model", head_dim="d_kv",
                intermediate_size="d_ff", num_hidden_layers="num_layers",
                num_decoder_layers="num_decoder_layers", num_attention_heads="num_heads",
                relative_attention_num_buckets="relative_attention_num_buckets",
                relative_attention_max_distance="relative_attention_max_distance",
                layer_norm_epsilon="layer_norm_epsilon", feed_forward_proj="feed_forward_proj",
                pad_token_id="pad_token_id", eos_token_id="eos_token_id",
                decoder_start_token_id="decoder_start_token_id")


def t5_text_config(**overrides) -> ml_collections.ConfigDict:
    """A T5 text config. Defaults are transformers' `T5Config()` (t5-small's sizes)."""
    c = ml_collections.ConfigDict()
    c.model_type = "t5"
    c.vocab_size = 32128
    c.hidden_size = 512  # d_model
    c.head_dim = 64  # d_kv; heads * head_dim need not equal hidden_size
    c.intermediate_size = 2048  # d_ff
    c.num_hidden_layers = 6  # encoder layers (num_layers)
    c.num_decoder_layers = 6
    c.num_attention_heads = 8
    c.relative_attention_num_buckets = 32
    c.relative_attention_max_distance = 128
    c.layer_norm_epsilon = 1e-6
    c.feed_forward_proj = "relu"  # relu | gated-gelu | [gated-]<activation>
    c.tie_word_embeddings = True  # no lm_head: logits against `shared`
    c.scale_decoder_outputs = True  # decoder output * hidden_size ** -0.5 before the head
    c.pad_token_id = 0
    c.eos_token_id = 1
    c.decoder_start_token_id = 0
    c.update(overrides)
    return c


def seq2seq_config(text=None, **overrides) -> ml_collections.ConfigDict:
    """An encoder-decoder language model on its own (`model_type` seq2seq_lm)."""
    from mllm_jax.config import runtime_fields
    c = ml_collections.ConfigDict()
    c.model_type = "seq2seq_lm"
    c.text = text if text is not None else t5_text_config()
    runtime_fields(c)
    c.update(overrides)
    return c


def feed_forward(t) -> tuple[str, bool]:
    """(activation name, gated) of `feed_forward_proj`, as `T5Config` derives them:
    "gated-gelu" is the tanh approximation (gelu_new), a plain "gelu" the exact one."""
    proj = t["feed_forward_proj"]
    parts = proj.split("-") if isinstance(proj, str) else []
    gated = len(parts) == 2 and parts[0] == "gated"
    act = parts[-1] if parts else None
    if proj == "gated-gelu":
        act = "gelu_new"
    return act, gated


INT_FIELDS = ("vocab_size", "hidden_size", "head_dim", "intermediate_size",
              "num_attention_heads", "relative_attention_num_buckets",
              "relative_attention_max_distance")


def check_text(t, where: str = "text config", names=None) -> None:
    """The constraints on a T5 text config (or a dict of its fields; `names` maps our field
    names to the ones the message should use, e.g. HF's): positive sizes, sane layer counts,
    buckets that the bucketing can split, a known feed-forward activation, token ids."""
    names = names or {}
    view = {names.get(k, k): v for k, v in dict(t).items()} if names else t

    def n(field):
        return names.get(field, field)
    for field in INT_FIELDS:
        checks.positive_int(view, n(field), where)
    checks.layer_count(view, n("num_hidden_layers"), where)
    checks.layer_count(view, n("num_decoder_layers"), where)
    checks.positive_number(view, n("layer_norm_epsilon"), where)
    buckets = view[n("relative_attention_num_buckets")]
    if buckets < 4:
        raise InvalidConfigError(
            f"{where}: {n('relative_attention_num_buckets')} = {buckets} must be at least 4 "
            "(the encoder's buckets are halved by direction, then again into exact and "
            "logarithmic ones); the config is damaged or was edited; restore it")
    distance = view[n("relative_attention_max_distance")]
    if distance <= buckets // 2:
        raise InvalidConfigError(
            f"{where}: {n('relative_attention_max_distance')} = {distance} must be more than "
            f"half of {n('relative_attention_num_buckets')} = {buckets} (the logarithmic "
            "buckets span the distances between); the config is damaged or was edited; "
            "restore it")
    act, gated = feed_forward(view)  # feed_forward_proj is spelled alike in both
    proj = view["feed_forward_proj"]
    if act not in ACTIVATIONS or (isinstance(proj, str) and "-" in proj and not gated):
        raise InvalidConfigError(
            f"{where}: feed_forward_proj = {proj!r} must be '<activation>' or "
            f"'gated-<activation>' with an activation of {sorted(ACTIVATIONS)}")
    for field in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        checks.token_id(view, n(field), where)


def text_from_hf(hf: dict, where: str = "config.json"):
    """Our T5 text config for an HF `T5Config` dict (fields it lacks take T5Config's
    defaults); the values are checked under their config.json names first."""
    d = dict(HF_DEFAULTS)
    d.update({k: hf[k] for k in HF_DEFAULTS if k in hf})
    if d["num_decoder_layers"] is None:
        d["num_decoder_layers"] = d["num_layers"]
    eos = d["eos_token_id"]
    d["eos_token_id"] = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if d["decoder_start_token_id"] is None:  # T5 starts decoding from the pad token
        d["decoder_start_token_id"] = d["pad_token_id"]
    check_text(d, where, names=HF_NAMES)
    act, gated = feed_forward(d)
    for field, derived in (("dense_act_fn", act), ("is_gated_act", gated)):
        if field in hf and hf[field] != derived:
            raise InvalidConfigError(
                f"{where}: {field} = {hf[field]!r} contradicts feed_forward_proj = "
                f"{d['feed_forward_proj']!r} (which gives {derived!r}); the config is "
                "damaged or was edited; restore it")
    if "scale_decoder_outputs" in hf:
        scale = bool(hf["scale_decoder_outputs"])
        tie = scale
    else:
        tie = hf.get("tie_word_embeddings", True) is not False
        scale = tie
    fields = {ours: d[theirs] for ours, theirs in HF_NAMES.items()}
    fields["layer_norm_epsilon"] = float(fields["layer_norm_epsilon"])
    return t5_text_config(**fields, tie_word_embeddings=tie, scale_decoder_outputs=scale)


def text_to_hf(t) -> dict:
    act, gated = feed_forward(t)
    hf = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
          "is_encoder_decoder": True, "dense_act_fn": act, "is_gated_act": gated,
          "tie_word_embeddings": bool(t.tie_word_embeddings),
          "scale_decoder_outputs": bool(t.scale_decoder_outputs)}
    hf.update({theirs: t[ours] for ours, theirs in HF_NAMES.items()})
    return hf


def text_forward_flops(t, seq: int, decoder_seq: int | None = None) -> float:
    """Matmul FLOPs of one sample: the encoder over `seq` tokens, the decoder over
    `decoder_seq` (default `seq`) tokens with cross-attention over the encoder's, and the
    output projection of the decoder tokens."""
    dec = seq if decoder_seq is None else decoder_seq
    d, inner = t.hidden_size, t.num_attention_heads * t.head_dim
    _, gated = feed_forward(t)
    ff = 2 * d * t.intermediate_size * (3 if gated else 2)

    def self_attention(n):
        return 2 * n * d * 4 * inner + 2 * 2 * n * n * inner
    encoder = t.num_hidden_layers * (self_attention(seq) + seq * ff)
    cross = 2 * dec * d * 2 * inner + 2 * seq * d * 2 * inner + 2 * 2 * dec * seq * inner
    decoder = t.num_decoder_layers * (self_attention(dec) + cross + dec * ff)
    return encoder + decoder + 2 * dec * d * t.vocab_size
