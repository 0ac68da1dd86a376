"""Conversation templates, label masks and tokenizers, with tokenizers trained here.

Five tokenizers, each saved as a checkpoint directory would hold it: a SentencePiece BPE
`tokenizer.model` like LLaMA's (byte fallback, no whitespace normalization), read with
transformers 5's default `legacy: false` and with `legacy: true`; and HF `tokenizer.json`
files built with `tokenizers`: a byte-level BPE with Llama-3's split regex, and Metaspace BPEs
with prepend_scheme "first" and "always" (the legacy one).
"""
import json
import os
import random

import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as LibTokenizer

from mllm_jax.data import templates as T
from mllm_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from mllm_jax.data.tokens import expand_image_tokens
from mllm_jax.train.losses import IGNORE_INDEX

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"]
WORDS = ("a an the red blue green cube sphere cone floor picture image what is in on of how "
         "many are there describe it two three large small left right object objects color "
         "shape question answer yes no cat dog sits next to behind").split()


def corpus():
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", " 123.", "\n"]))
    # The template texts, so that they tokenize into a few pieces, not characters.
    lines += [T.VICUNA_SYSTEM, T.LLAVA_LLAMA_2_SYSTEM, "You are a helpful assistant.",
              "USER: ASSISTANT: [INST] [/INST] <<SYS>>\n <</SYS>>\n\n system user assistant"] * 20
    lines.append("".join(chr(c) for c in range(32, 127)) + "\n\t")
    return lines


def _write(directory, name, obj):
    with open(os.path.join(directory, name), "w") as f:
        json.dump(obj, f, indent=1)


def _added(entries):
    return {str(i): {"content": c, "special": True, "lstrip": False, "rstrip": False,
                     "normalized": False, "single_word": False} for c, i in entries}


def make_sentencepiece(directory, legacy: bool):
    os.makedirs(directory, exist_ok=True)
    model = os.path.join(directory, "tokenizer.model")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=model[:-len(".model")],
        vocab_size=700, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        user_defined_symbols=CHAT_TOKENS, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=model)
    v = sp.get_piece_size()
    added = [("<unk>", 0), ("<s>", 1), ("</s>", 2)] + [(t, sp.piece_to_id(t))
                                                       for t in CHAT_TOKENS]
    added += [("<image>", v), ("<pad>", v + 1)]  # beyond the SP vocabulary, as in llava-hf
    _write(directory, "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "added_tokens_decoder": _added(added)})
    _write(directory, "special_tokens_map.json", {
        "bos_token": {"content": "<s>"}, "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>"})
    _write(directory, "config.json", {"model_type": "llava", "image_token_index": v,
                                      "pad_token_id": v + 1})
    return directory


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_hf(directory, kind: str):
    """kind: "bytelevel" (Llama-3 / Qwen style) or "metaspace" / "metaspace_legacy"."""
    os.makedirs(directory, exist_ok=True)
    if kind == "bytelevel":
        bos, eos, pad = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
        unk = None
        tok = LibTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        bos, eos, pad, unk = "<s>", "</s>", "<pad>", "<unk>"
        scheme = "always" if kind == "metaspace_legacy" else "first"
        tok = LibTokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme, split=True)
        tok.decoder = decoders.Metaspace(prepend_scheme=scheme, split=True)
        alphabet = [chr(c) for c in range(32, 127)] + ["\n", "▁"]
    specials = [t for t in (unk, bos, eos) if t] + CHAT_TOKENS + ["<image>", pad]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in specials}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "pad_token": pad, "added_tokens_decoder": _added(ids.items())}
    if unk:
        cfg["unk_token"] = unk
    _write(directory, "tokenizer_config.json", cfg)
    _write(directory, "special_tokens_map.json", {"bos_token": bos, "eos_token": eos,
                                                  "pad_token": pad})
    _write(directory, "config.json", {"model_type": "llava", "image_token_index": ids["<image>"],
                                      "text_config": {"pad_token_id": ids[pad]}})
    return directory


TOKENIZERS = ["sp", "sp_legacy", "hf_bytelevel", "hf_metaspace", "hf_metaspace_legacy"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    sp = make_sentencepiece(str(root / "sp"), legacy=False)
    sp_legacy = str(root / "sp_legacy")
    os.makedirs(sp_legacy)
    for name in os.listdir(sp):
        with open(os.path.join(sp, name), "rb") as f:
            blob = f.read()
        if name == "tokenizer_config.json":
            blob = json.dumps({**json.loads(blob), "legacy": True}).encode()
        with open(os.path.join(sp_legacy, name), "wb") as f:
            f.write(blob)
    dirs = {"sp": sp, "sp_legacy": sp_legacy}
    for kind in ("bytelevel", "metaspace", "metaspace_legacy"):
        dirs[f"hf_{kind}"] = make_hf(str(root / kind), kind)
    return dirs


@pytest.fixture(scope="module")
def toks(checkpoints):
    return {name: load_tokenizer(d) for name, d in checkpoints.items()}


@pytest.fixture(scope="module")
def reference_encoders(checkpoints, toks):
    """Independent implementations of "tokenize this text in one piece": the `tokenizers`
    library itself for tokenizer.json, transformers' LlamaTokenizer (the class LLaMA, Vicuna
    and LLaVA checkpoints name; it reads `legacy`) for tokenizer.model."""
    import transformers

    refs = {}
    for name, d in checkpoints.items():
        if name.startswith("sp"):
            hf = transformers.LlamaTokenizer.from_pretrained(d)
            assert hf.legacy == (name == "sp_legacy")
            refs[name] = lambda text, bos, hf=hf: hf(text, add_special_tokens=bos)["input_ids"]
        else:
            lib = LibTokenizer.from_file(os.path.join(d, "tokenizer.json"))
            bos_id = toks[name].bos_id
            refs[name] = lambda text, bos, lib=lib, b=bos_id: (
                [b] * bos + lib.encode(text, add_special_tokens=False).ids)
    return refs


# ---- reference data --------------------------------------------------------------------
CONV = [
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": "A red cube on a blue floor."},
    {"from": "human", "value": "How many cubes are there? Describe <image> too."},
    {"from": "gpt", "value": "There are 3 cubes, two large."},
]
ANSWERS = [CONV[1]["value"], CONV[3]["value"]]
CAPTION = [{"from": "human", "value": "Describe the image.\n<image>"},
           {"from": "gpt", "value": "A small green cone left of a sphere."}]


def golden_text(template, tok):
    """The rendered text, written out by hand from the reference formats."""
    q1, a1, q2, a2 = (m["value"] for m in CONV)
    eos, bos = tok.eos_token, tok.bos_token
    if template == "plain":
        return "<image>" + CAPTION[1]["value"] + eos
    if template == "vicuna_v1":
        return (f"{T.VICUNA_SYSTEM} USER: {q1} ASSISTANT: {a1}{eos}"
                f"USER: {q2} ASSISTANT: {a2}{eos}")
    if template == "llama_2":
        return (f"[INST] <<SYS>>\n{T.LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n{q1} [/INST] {a1} {eos}"
                f"{bos}[INST] {q2} [/INST] {a2} {eos}")
    if template == "mistral":
        return f"[INST] {q1} [/INST] {a1}{eos}[INST] {q2} [/INST] {a2}{eos}"
    if template == "llama_3":
        h = "<|start_header_id|>{}<|end_header_id|>\n\n".format
        return (f"{h('user')}{q1}<|eot_id|>{h('assistant')}{a1}<|eot_id|>"
                f"{h('user')}{q2}<|eot_id|>{h('assistant')}{a2}<|eot_id|>")
    if template == "chatml":
        return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                f"<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\n{a1}<|im_end|>\n"
                f"<|im_start|>user\n{q2}<|im_end|>\n<|im_start|>assistant\n{a2}<|im_end|>\n")
    raise KeyError(template)


def expected_targets(template, tok):
    """What the unmasked label spans must decode to: the assistant texts plus end tokens."""
    if template == "plain":
        return [CAPTION[1]["value"] + tok.eos_token]
    end = {"llama_3": "<|eot_id|>", "chatml": "<|im_end|>"}.get(template, tok.eos_token)
    if template == "llama_2":
        end = " " + end
    return [a + end for a in ANSWERS]


def label_spans(labels):
    spans, start = [], None
    for k, x in enumerate(list(labels) + [IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = k
        elif x == IGNORE_INDEX and start is not None:
            spans.append((start, k))
            start = None
    return spans


def image_runs(ids, image_id):
    return [e - s for s, e in label_spans([x if x == image_id else IGNORE_INDEX for x in ids])]


def conv_for(template):
    return CAPTION if template == "plain" else CONV


# ---- acceptance: every template x every tokenizer --------------------------------------
@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("template", sorted(T.TEMPLATES))
def test_labels_match_reference(toks, reference_encoders, tok_name, template):
    tok = toks[tok_name]
    conv = conv_for(template)
    counts = [4] if template == "plain" else [4, 7]
    ex = T.build_example(conv, template, tok, image_tokens_per_image=counts, max_length=4096,
                         sample_id="s1")
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    assert ex["num_images"] == len(counts) and not ex["truncated"]

    # The whole sequence is the hand-written prompt, tokenized in one piece by the reference
    # implementation, with images expanded.
    add_bos = T.TEMPLATES[template].add_bos
    assert T.render_text(conv, template, tok) == golden_text(template, tok)
    ref = reference_encoders[tok_name](golden_text(template, tok), add_bos)
    assert ref == tok.encode(golden_text(template, tok), add_bos=add_bos)
    assert ref.count(tok.image_token_id) == len(counts)
    it = iter(counts)
    expanded = [x for i in ref for x in ([i] * next(it) if i == tok.image_token_id else [i])]
    assert ids == expanded

    # Images: one run per image, of its own length, masked.
    assert image_runs(ids, tok.image_token_id) == counts
    assert all(l == IGNORE_INDEX for i, l in zip(ids, labels) if i == tok.image_token_id)

    # Loss exactly on the assistant texts plus their end tokens.
    spans = label_spans(labels)
    want = expected_targets(template, tok)
    assert len(spans) == len(want)
    for (s, e), text in zip(spans, want):
        assert labels[s:e] == ids[s:e]
        assert tok.decode(labels[s:e]).strip() == text.strip()


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("template", sorted(T.TEMPLATES))
def test_generation_prompt_is_the_training_prefix(toks, tok_name, template):
    tok = toks[tok_name]
    conv = conv_for(template)
    ex = T.build_example(conv, template, tok, image_tokens_per_image=5, max_length=4096,
                         sample_id=0)
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    for end in range(1, len(conv), 2):  # every prompt that ends with a user message
        prompt = T.build_prompt(conv[:end], template, tok, image_tokens_per_image=5).tolist()
        assert ids[:len(prompt)] == prompt
        # Loss starts exactly where the prompt ends (and, before, only on earlier answers).
        assert labels[len(prompt) - 1] == IGNORE_INDEX != labels[len(prompt)]
        assert len(label_spans(labels[:len(prompt)])) == end // 2


# ---- the tokenizer interface ----------------------------------------------------------
@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_tokenizer_interface(checkpoints, toks, tok_name):
    tok = toks[tok_name]
    cfg = json.load(open(os.path.join(checkpoints[tok_name], "config.json")))
    assert tok.image_token == "<image>"
    assert tok.image_token_id == cfg["image_token_index"] == tok.token_id("<image>")
    pad_id = cfg.get("pad_token_id", cfg.get("text_config", {}).get("pad_token_id"))
    assert tok.pad_id == pad_id
    assert tok.bos_id == tok.token_id(tok.bos_token) and tok.eos_id == tok.token_id(tok.eos_token)
    assert tok.bos_id != tok.eos_id
    text = "A red cube, 3 spheres!\nWhat is it?"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.decode(ids[1:]) == text
    assert tok.decode(ids, skip_special=True) == text
    assert tok.encode("<image>x</s>".replace("</s>", tok.eos_token))[0] == tok.image_token_id
    assert tok.decode([tok.image_token_id]) == "<image>"
    assert isinstance(tok, SentencePieceTokenizer if tok_name.startswith("sp") else HFTokenizer)
    with pytest.raises(KeyError, match="not a token"):
        tok.token_id("<definitely-not-a-token>")


def test_load_tokenizer_errors(tmp_path, checkpoints):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))
    # config.json disagreeing with the tokenizer about the image token is an error.
    bad = tmp_path / "bad"
    bad.mkdir()
    src = checkpoints["hf_bytelevel"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bad / name).write_bytes(open(os.path.join(src, name), "rb").read())
    _write(str(bad), "config.json", {"image_token_index": 3})
    with pytest.raises(ValueError, match="image token"):
        load_tokenizer(str(bad))
    # A damaged json file of the checkpoint is named (not a bare JSONDecodeError).
    (bad / "config.json").write_text("{}")
    (bad / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(ValueError, match="is not valid JSON") as e:
        load_tokenizer(str(bad))
    assert str(bad / "tokenizer_config.json") in str(e.value)
    (bad / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="not an object"):
        load_tokenizer(str(bad))


def test_image_token_without_tokenizer_entry(tmp_path, checkpoints):
    """A tokenizer without "<image>" (e.g. Vicuna's) takes the id from config.json."""
    d = tmp_path / "plain_sp"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(
        open(os.path.join(checkpoints["sp"], "tokenizer.model"), "rb").read())
    _write(str(d), "config.json", {"image_token_index": 32000})
    tok = load_tokenizer(str(d))
    assert tok.image_token_id == 32000 and tok.pad_id is None
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    ex = T.build_example(CONV, "vicuna_v1", tok, image_tokens_per_image=3, max_length=999,
                         sample_id="v")
    assert image_runs(ex["input_ids"].tolist(), 32000) == [3, 3]


# ---- conversation shapes -----------------------------------------------------------------
@pytest.mark.parametrize("template", sorted(set(T.TEMPLATES) - {"plain"}))
def test_text_only_and_single_turn(toks, template):
    tok = toks["sp"]
    conv = [{"from": "human", "value": "What color is the cube?"},
            {"from": "gpt", "value": "Red."}]
    ex = T.build_example(conv, template, tok, image_tokens_per_image=5, max_length=512,
                         sample_id="t")
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    assert tok.image_token_id not in ids and ex["num_images"] == 0
    spans = label_spans(labels)
    assert len(spans) == 1
    assert tok.decode(labels[spans[0][0]:spans[0][1]]).startswith("Red.")


def test_plain_text_only_caption(toks):
    tok = toks["hf_bytelevel"]
    ex = T.build_example([{"from": "human", "value": ""}, {"from": "gpt", "value": "A cat."}],
                         "plain", tok, image_tokens_per_image=9, max_length=64, sample_id=1)
    assert ex["input_ids"].tolist() == [tok.bos_id] + tok.encode("A cat.") + [tok.eos_id]
    assert ex["labels"][0] == IGNORE_INDEX and (ex["labels"][1:] == ex["input_ids"][1:]).all()


def test_system_message_and_override(toks):
    tok = toks["hf_metaspace"]
    conv = [{"from": "system", "value": "Be brief."}] + CONV[:2]
    assert T.render_text(conv, "chatml", tok).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    text = T.render_text(CONV[:2], "llama_3", tok, system="Be brief.")
    assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert T.render_text(CONV[:2], "llama_3", tok).startswith("<|start_header_id|>user")


def test_image_token_expansion_counts(toks):
    tok = toks["sp"]
    conv = [{"from": "human", "value": "<image><image>\nCompare these."},
            {"from": "gpt", "value": "The left one is red."},
            {"from": "human", "value": "And this one? <image>"},
            {"from": "gpt", "value": "Blue."}]
    ex = T.build_example(conv, "vicuna_v1", tok, image_tokens_per_image=[2, 3, 5],
                         max_length=1000, sample_id="mi")
    ids = ex["input_ids"].tolist()
    # Adjacent images form one run; their total and order are what was asked.
    assert sum(x == tok.image_token_id for x in ids) == 10
    assert image_runs(ids, tok.image_token_id) == [5, 5]
    # Same thing with the shared helper the demo uses, one count for all images.
    plain = T.build_example(conv, "vicuna_v1", tok, image_tokens_per_image=1, max_length=1000,
                            sample_id="mi")["input_ids"].tolist()
    assert expand_image_tokens(plain, tok.image_token_id, 4) == T.build_example(
        conv, "vicuna_v1", tok, image_tokens_per_image=4, max_length=1000,
        sample_id="mi")["input_ids"].tolist()
    with pytest.raises(T.MalformedConversation, match="'mi'.*3 <image> placeholders but 2"):
        T.build_example(conv, "vicuna_v1", tok, image_tokens_per_image=[2, 3], max_length=99,
                        sample_id="mi")


# ---- truncation and dropping -------------------------------------------------------------
def test_truncation_never_cuts_an_image(toks):
    tok = toks["hf_bytelevel"]
    counts = [6, 9]
    full = T.build_example(CONV, "llama_3", tok, image_tokens_per_image=counts,
                           max_length=10_000, sample_id="tr")
    n = len(full["input_ids"])
    image_id = tok.image_token_id
    starts = [k for k, x in enumerate(full["input_ids"].tolist())
              if x == image_id and (k == 0 or full["input_ids"][k - 1] != image_id)]
    seen_reasons = set()
    for max_length in range(1, n + 2):
        ex = T.build_example(CONV, "llama_3", tok, image_tokens_per_image=counts,
                             max_length=max_length, sample_id="tr")
        if isinstance(ex, T.Dropped):
            seen_reasons.add(ex.reason)
            assert ex.sample_id == "tr"
            continue
        ids = ex["input_ids"].tolist()
        assert len(ids) <= max_length
        assert ids == full["input_ids"].tolist()[:len(ids)]
        assert ex["truncated"] == (max_length < n)
        kept = image_runs(ids, image_id)
        assert kept == counts[:len(kept)] and ex["num_images"] == len(kept)
        if len(ids) < min(max_length, n):  # cut short only to keep an image whole
            assert len(ids) in starts
        assert (ex["labels"][1:] != IGNORE_INDEX).any()
    assert seen_reasons == {T.IMAGE_DOES_NOT_FIT, T.PROMPT_TOO_LONG}


def test_unfittable_sample_is_dropped_with_reason(toks):
    tok = toks["sp"]
    ex = T.build_example(CONV, "vicuna_v1", tok, image_tokens_per_image=[500, 5],
                         max_length=256, sample_id="big")
    assert isinstance(ex, T.Dropped)
    assert (ex.sample_id, ex.reason) == ("big", T.IMAGE_DOES_NOT_FIT)
    assert "max_length 256" in ex.detail
    long_q = [{"from": "human", "value": "what is " * 200}, {"from": "gpt", "value": "Yes."}]
    ex = T.build_example(long_q, "chatml", tok, image_tokens_per_image=5, max_length=64,
                         sample_id=7)
    assert isinstance(ex, T.Dropped) and ex.reason == T.PROMPT_TOO_LONG and ex.sample_id == 7


# ---- errors that name the sample ------------------------------------------------------
class _FakeEos:
    """Just enough tokenizer to render a template's text."""
    eos_token, bos_token, source = "</s>", "<s>", "fake"

    def is_special(self, token):
        return token in ("</s>", "<s>")


def test_tokenization_mismatch_names_the_sample(tmp_path):
    """A BPE whose merges cross the prompt/answer boundary: ": " is one token in context,
    ":" + " A..." when tokenized separately."""
    text = T.render_text([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Ok"}],
                         "vicuna_v1", _FakeEos())
    chars = sorted(set(text.replace("</s>", "")))
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    vocab[": "] = len(vocab)
    lib = LibTokenizer(models.BPE(vocab=vocab, merges=[(":", " ")]))
    lib.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    lib.save(str(tmp_path / "tokenizer.json"))
    _write(str(tmp_path), "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    tok = load_tokenizer(str(tmp_path))
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Ok"}]
    where = "ASSISTANT:.{1,3}before the target segment ' Ok</s>'"
    with pytest.raises(T.TokenizationMismatch, match=f"sample 'bad-42'.*{where}") as e:
        T.build_example(conv, "vicuna_v1", tok, image_tokens_per_image=1, max_length=99,
                        sample_id="bad-42")
    assert e.value.sample_id == "bad-42"


def test_malformed_conversations_name_the_sample(toks):
    tok = toks["sp"]
    cases = {
        "no-answer": [{"from": "human", "value": "Hi"}],
        "two-users": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                      {"from": "gpt", "value": "c"}],
        "gpt-first": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
        "image-in-answer": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}],
        "bad-role": [{"from": "robot", "value": "a"}],
    }
    for sample_id, conv in cases.items():
        with pytest.raises(T.MalformedConversation, match=f"sample '{sample_id}'"):
            T.build_example(conv, "vicuna_v1", tok, image_tokens_per_image=1, max_length=99,
                            sample_id=sample_id)
    with pytest.raises(T.MalformedConversation, match="sample 'multi'.*one exchange"):
        T.build_example(CONV, "plain", tok, image_tokens_per_image=1, max_length=999,
                        sample_id="multi")


def test_image_token_id_checks(tmp_path, checkpoints, toks):
    tok = toks["hf_bytelevel"]
    with pytest.raises(ValueError, match="differs from the tokenizer's '<image>'"):
        T.build_example(CONV, "chatml", tok, image_tokens_per_image=1, max_length=999,
                        sample_id="c", image_token_id=tok.image_token_id + 1)
    # A tokenizer without an image token, given an id that text also produces.
    (tmp_path / "tokenizer.model").write_bytes(
        open(os.path.join(checkpoints["sp"], "tokenizer.model"), "rb").read())
    bare = load_tokenizer(str(tmp_path))
    assert bare.image_token_id is None
    with pytest.raises(ValueError, match="no image_token_id"):
        T.build_example(CONV, "vicuna_v1", bare, image_tokens_per_image=1, max_length=999,
                        sample_id="c")
    red = bare.encode("a red cube")[1]
    with pytest.raises(T.TokenizationMismatch, match="sample 'c'.*encodes to the image token"):
        T.build_example(CONV, "vicuna_v1", bare, image_tokens_per_image=1, max_length=999,
                        sample_id="c", image_token_id=red)


def test_template_needs_its_special_tokens(tmp_path, checkpoints):
    d = tmp_path / "nochat"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(
        open(os.path.join(checkpoints["sp"], "tokenizer.model"), "rb").read())
    tok = SentencePieceTokenizer(str(d / "tokenizer.model"))
    # The SP model has the chat tokens as user-defined pieces, so they are special; a plain
    # BPE without them is not usable with chatml.
    assert tok.is_special("<|im_end|>")
    lib = LibTokenizer(models.BPE(vocab={"a": 0, "<s>": 1, "</s>": 2}, merges=[]))
    lib.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    lib.save(str(tmp_path / "tokenizer.json"))
    _write(str(tmp_path), "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(ValueError, match="chatml.*<\\|im_start\\|>"):
        T.build_example(CONV, "chatml", load_tokenizer(str(tmp_path)), image_tokens_per_image=1,
                        max_length=99, sample_id=0)
