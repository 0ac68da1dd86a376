"""Tokenizers behind one interface, read from a checkpoint directory.

Two backends: a SentencePiece `tokenizer.model` (LLaMA-1/2, Vicuna, Mistral) and an HF
`tokenizer.json` read with the `tokenizers` library itself (not transformers), so the runtime
path needs no torch. `load_tokenizer(dir)` prefers `tokenizer.json` when both exist, as
transformers does.

Special tokens come from the checkpoint's own files, read the way transformers reads them:
tokenizer_config.json (`added_tokens_decoder`, `bos/eos/unk/pad_token`, `image_token`,
`legacy`), special_tokens_map.json and added_tokens.json. config.json's `image_token_index`
(or `image_token_id`) and `pad_token_id` win when present: they are the ids the model was
trained with. An image token that the tokenizer maps to another id than config.json says is
an error (the text "<image>" would silently encode to the wrong id).

Special tokens are atomic: text is split on them before the backend sees it, as transformers
does, so "</s>" or "<|im_end|>" written in a template become one id.

Context. How a text piece tokenizes depends on what precedes it, because SentencePiece-style
tokenizers prepend a "▁" (dummy prefix) to the start of a text. There are three contexts:
START (beginning of the text: prefix added unless the text starts with a space), MIDDLE
(continuing text: no prefix), and AFTER_SPECIAL (right after a special token: a prefix only
for "legacy" tokenizers, i.e. transformers' `legacy=True` / Metaspace
`prepend_scheme="always"`; transformers 5 defaults `legacy` to False, and so do we when
tokenizer_config.json does not say). `encode_segments` tokenizes
texts separately but each in the context it has in the concatenated text, so that the
concatenation equals `encode` of the joined text whenever every boundary is also a token
boundary in context; the conversation templates check exactly that.
"""
from __future__ import annotations

import json
import re

from mllm_jax import jsonfile, storage

START, AFTER_SPECIAL, MIDDLE = "start", "after_special", "middle"

DEFAULT_IMAGE_TOKEN = "<image>"


class Tokenizer:
    """Common interface. Backends implement `_encode_piece`, `_decode_piece`, `_lookup`,
    `_backend_id_to_token` and `_backend_vocab_size`."""

    source: str  # the checkpoint directory (or file) it was read from, for error messages
    special_tokens: dict  # atomic token string -> id
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    image_token: str
    image_token_id: int | None

    # ---- public interface -------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, *, extra_special: dict | None = None
               ) -> list[int]:
        """Token ids of `text` tokenized in one piece (the reference tokenization; for
        tokenizer.json, the library's own encode, which splits its added tokens itself).

        `extra_special` maps more strings to ids to treat as atomic special tokens (e.g. the
        image placeholder when the tokenizer itself lacks one)."""
        ids = self._bos_prefix(add_bos)
        pattern, specials = self._pattern(extra_special, native=False)
        ctx = START
        for piece, special in _split(text, pattern):
            if special:
                ids.append(specials[piece])
                ctx = AFTER_SPECIAL
            else:
                ids.extend(self._encode_chunk(piece, ctx))
                ctx = MIDDLE
        return ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Token ids as the HF tokenizer's `__call__` gives them (add_special_tokens=True):
        with the special tokens its post-processor adds (BOS for LLaMA / OPT, EOS after
        the text for T5, [CLS] ... [SEP] for BERT). Without a post-processor (SentencePiece
        `tokenizer.model`): BOS, then the text."""
        return self.encode(text, add_bos=self.bos_id is not None)

    def encode_segments(self, texts, *, extra_special: dict | None = None) -> list[list[int]]:
        """Tokenizes each text separately, each in the context it has in "".join(texts)."""
        pattern, specials = self._pattern(extra_special, native=True)
        ctx = START
        out = []
        for text in texts:
            ids = []
            for piece, special in _split(text, pattern):
                if special:
                    ids.append(specials[piece])
                    ctx = AFTER_SPECIAL
                else:
                    ids.extend(self._encode_piece(piece, ctx))
                    ctx = MIDDLE
            out.append(ids)
        return out

    def decode(self, ids, skip_special: bool = False) -> str:
        by_id = self._special_by_id()
        out, run, ctx = [], [], START

        def flush():
            nonlocal ctx
            if run:
                out.append(self._decode_piece(list(run), self._prefixed(ctx)))
                run.clear()
                ctx = MIDDLE

        for k, i in enumerate(ids):
            i = int(i)
            if i in by_id:
                flush()
                if not skip_special:
                    out.append(by_id[i])
                # A leading BOS is what encode(add_bos=True) puts before START text.
                ctx = START if k == 0 and i == self.bos_id else AFTER_SPECIAL
            else:
                if i < 0 or i >= self._backend_vocab_size():
                    raise ValueError(f"token id {i} is outside the vocabulary of the tokenizer "
                                     f"at {self.source}")
                run.append(i)
        flush()
        return "".join(out)

    def token_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        i = self._lookup(token)
        if i is None:
            raise KeyError(f"{token!r} is not a token of the tokenizer at {self.source}")
        return i

    def id_to_token(self, i: int) -> str:
        by_id = self._special_by_id()
        return by_id[i] if i in by_id else self._backend_id_to_token(i)

    def is_special(self, token: str) -> bool:
        """True when `token` is encoded atomically wherever it appears in a text."""
        return token in self.special_tokens

    @property
    def vocab_size(self) -> int:
        return max([self._backend_vocab_size()] + [i + 1 for i in self.special_tokens.values()])

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.id_to_token(self.eos_id)

    def __repr__(self):
        return (f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, "
                f"image={self.image_token!r}:{self.image_token_id})")

    # ---- shared machinery -------------------------------------------------------------
    _prefix_after_special = False  # does text right after a special token get a prefix?
    _native_specials: frozenset = frozenset()  # specials the backend splits by itself

    def _prefixed(self, ctx) -> bool:
        return ctx == START or (ctx == AFTER_SPECIAL and self._prefix_after_special)

    def _bos_prefix(self, add_bos):
        if not add_bos:
            return []
        if self.bos_id is None:
            raise ValueError(f"the tokenizer at {self.source} has no BOS token")
        return [self.bos_id]

    def _encode_chunk(self, text, ctx):
        """Encodes text that may hold specials the backend handles natively (default: none)."""
        return self._encode_piece(text, ctx)

    def _special_by_id(self):
        if self._by_id is None:
            self._by_id = {}
            for tok, i in sorted(self.special_tokens.items()):
                self._by_id.setdefault(i, tok)
        return self._by_id

    def _pattern(self, extra, native):
        """Regex splitting on the specials (all of them, or only those the backend does not
        split natively) plus `extra`; cached."""
        key = (tuple(sorted((extra or {}).items())), native)
        if key not in self._patterns:
            specials = dict(self.special_tokens)
            for tok, i in (extra or {}).items():
                if tok in specials and specials[tok] != i:
                    raise ValueError(f"{tok!r} is token {specials[tok]} of the tokenizer at "
                                     f"{self.source}, not {i}")
                specials[tok] = i
            split_on = [t for t in specials
                        if native or t not in self._native_specials or t in (extra or {})]
            split_on.sort(key=len, reverse=True)  # longest first: "<s>" inside "<s>x" etc.
            rx = re.compile("|".join(map(re.escape, split_on))) if split_on else None
            self._patterns[key] = (rx, specials)
        return self._patterns[key]

    def _resolve_specials(self, cfg: "_CheckpointConfig", builtin: dict, default_ids: dict):
        """Sets special_tokens and the bos/eos/unk/pad/image ids from the checkpoint files."""
        self._by_id, self._patterns = None, {}
        specials = dict(builtin)
        for tok, i in cfg.added.items():
            known = specials.get(tok, self._lookup(tok))
            if known is not None and known != i:
                raise ValueError(f"{self.source}: added token {tok!r} has id {i} in the "
                                 f"tokenizer config but {known} in the vocabulary")
            specials[tok] = i
        self.special_tokens = specials

        def resolve(name, required):
            tok = cfg.named.get(name)
            if tok is None:
                return None
            i = specials.get(tok, self._lookup(tok))
            if i is None:
                if required:
                    raise ValueError(f"{self.source}: {name}_token {tok!r} is not in the "
                                     f"vocabulary")
                return None
            specials[tok] = i
            return i

        for tok in cfg.extra_special:  # additional_special_tokens: atomic when known
            i = specials.get(tok, self._lookup(tok))
            if i is not None:
                specials[tok] = i
        ids = {name: resolve(name, required=name in ("bos", "eos"))
               for name in ("bos", "eos", "unk", "pad")}

        def first_int(*vals):
            return next((v for v in vals if isinstance(v, int) and not isinstance(v, bool)),
                        None)

        self.bos_id = first_int(ids["bos"], cfg.model.get("bos_token_id"), default_ids.get("bos"))
        self.eos_id = first_int(ids["eos"], cfg.model.get("eos_token_id"), default_ids.get("eos"))
        self.unk_id = first_int(ids["unk"], default_ids.get("unk"))
        self.pad_id = first_int(cfg.model.get("pad_token_id"), ids["pad"], default_ids.get("pad"))

        self.image_token = cfg.image_token or DEFAULT_IMAGE_TOKEN
        own = specials.get(self.image_token, self._lookup(self.image_token))
        configured = first_int(cfg.model.get("image_token_index"), cfg.model.get("image_token_id"))
        if configured is not None and own is not None and own != configured:
            raise ValueError(f"{self.source}: config.json says the image token id is "
                             f"{configured} but the tokenizer encodes {self.image_token!r} "
                             f"as {own}")
        self.image_token_id = configured if configured is not None else own
        if self.image_token_id is not None:
            specials[self.image_token] = self.image_token_id


def _split(text, pattern):
    """Yields (piece, is_special) in order; empty text pieces are skipped."""
    if pattern is None:
        if text:
            yield text, False
        return
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            yield text[pos:m.start()], False
        yield m.group(), True
        pos = m.end()
    if pos < len(text):
        yield text[pos:], False


# ---- checkpoint configuration ----------------------------------------------------------
class _CheckpointConfig:
    """What the checkpoint's json files say about special tokens."""

    def __init__(self, directory):
        def read(name):
            path = storage.join(directory, name)
            if not storage.exists(path):
                return {}
            return jsonfile.read_object(path, "restore it from the checkpoint it came from")

        tok_cfg = read("tokenizer_config.json")
        special_map = read("special_tokens_map.json")
        added_json = read("added_tokens.json")
        model_cfg = read("config.json")

        self.added = {}  # content -> id
        for content, i in added_json.items():
            self.added[content] = int(i)
        for i, entry in tok_cfg.get("added_tokens_decoder", {}).items():
            self.added[_content(entry)] = int(i)

        self.named = {}
        for name in ("bos", "eos", "unk", "pad"):
            key = f"{name}_token"
            tok = _content(tok_cfg.get(key)) or _content(special_map.get(key))
            if tok is not None:
                self.named[name] = tok
        extra = []
        for src in (special_map, tok_cfg):
            for key in ("additional_special_tokens", "extra_special_tokens"):
                vals = src.get(key) or []
                vals = vals.values() if isinstance(vals, dict) else vals
                extra.extend(_content(v) for v in vals)
        self.extra_special = [t for t in extra if t]
        self.image_token = _content(tok_cfg.get("image_token")) or _content(
            special_map.get("image_token"))
        self.legacy = tok_cfg.get("legacy")
        # Multimodal configs keep the token ids of the language model under text_config.
        text_cfg = model_cfg.get("text_config") or {}
        self.model = {k: model_cfg.get(k, text_cfg.get(k)) for k in
                      ("bos_token_id", "eos_token_id", "pad_token_id")}
        self.model["image_token_index"] = model_cfg.get("image_token_index")
        self.model["image_token_id"] = model_cfg.get("image_token_id")


def _content(v):
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


# ---- SentencePiece backend -------------------------------------------------------------
class SentencePieceTokenizer(Tokenizer):
    """`tokenizer.model`, with the semantics of transformers' LlamaTokenizer (Metaspace over the
    SentencePiece vocabulary). Without a prefix the text is encoded by a copy of the model
    whose normalizer has `add_dummy_prefix` off.

    `legacy` (tokenizer_config.json; transformers 5 defaults it to False) decides whether text
    right after a special token gets the dummy prefix, e.g. "</s>USER" -> "▁USER" (legacy) or
    "USER" (not legacy)."""

    def __init__(self, model_file: str, cfg: _CheckpointConfig | None = None, source=None):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb2

        self.source = source or model_file
        with storage.open_file(model_file, "rb") as f:
            blob = f.read()
        proto = pb2.ModelProto()
        proto.ParseFromString(blob)
        self._sp = spm.SentencePieceProcessor(model_proto=blob)
        if proto.normalizer_spec.add_dummy_prefix:
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        else:
            self._sp_bare = self._sp
        cfg = cfg or _CheckpointConfig(storage.dirname(model_file))
        self._prefix_after_special = bool(cfg.legacy) if cfg.legacy is not None else False
        kinds = (pb2.ModelProto.SentencePiece.CONTROL, pb2.ModelProto.SentencePiece.USER_DEFINED,
                 pb2.ModelProto.SentencePiece.UNKNOWN)
        builtin = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in kinds}
        sp = self._sp
        defaults = {name: (v if v >= 0 else None) for name, v in
                    (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()),
                     ("pad", sp.pad_id()))}
        self._resolve_specials(cfg, builtin, defaults)

    def _encode_piece(self, text, ctx):
        # As transformers' Metaspace: no dummy prefix on text that already starts with a
        # space (SentencePiece itself would add a second "▁").
        prefix = self._prefixed(ctx) and not text.startswith(" ")
        return (self._sp if prefix else self._sp_bare).encode(text)

    def _decode_piece(self, ids, prefixed):
        return (self._sp if prefixed else self._sp_bare).decode(ids)

    def _lookup(self, token):
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def _backend_id_to_token(self, i):
        return self._sp.id_to_piece(i)

    def _backend_vocab_size(self):
        return self._sp.get_piece_size()


# ---- HF tokenizer.json backend ---------------------------------------------------------
class HFTokenizer(Tokenizer):
    """`tokenizer.json` through the `tokenizers` library.

    `encode` lets the library split its own added tokens and apply its own prefix rules (the
    reference). `encode_segments` needs pieces in a given context: START is a plain encode;
    MIDDLE uses a copy of the tokenizer with every prefix-space step removed (Prepend
    normalizer, Metaspace prepend_scheme, ByteLevel add_prefix_space); AFTER_SPECIAL encodes a
    special token followed by the text and drops the special token's id, which reproduces what
    the library does after any special token."""

    def __init__(self, json_file: str, cfg: _CheckpointConfig | None = None, source=None):
        from tokenizers import Tokenizer as _Lib

        self.source = source or json_file
        self._tok = _Lib.from_str(storage.read_text(json_file)) if storage.is_remote(json_file) \
            else _Lib.from_file(json_file)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._bare = _Lib.from_str(json.dumps(_without_prefix_space(json.loads(
            self._tok.to_str()))))
        added = self._tok.get_added_tokens_decoder()
        builtin = {t.content: i for i, t in added.items()}
        self._native_specials = frozenset(builtin)
        # A sentinel for AFTER_SPECIAL: a special added token that strips no whitespace.
        self._sentinel = next(((t.content, i) for i, t in sorted(added.items())
                               if t.special and not (t.lstrip or t.rstrip or t.single_word)),
                              None)
        if self._sentinel is not None:
            self._prefix_after_special = (self._encode_piece("x", AFTER_SPECIAL)
                                          != self._encode_piece("x", MIDDLE))
        cfg = cfg or _CheckpointConfig(storage.dirname(json_file))
        self._resolve_specials(cfg, builtin, {})

    def _native(self, tok, text):
        return tok.encode(text, add_special_tokens=False).ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def _encode_chunk(self, text, ctx):
        if ctx == START:
            return self._native(self._tok, text)
        return self._encode_piece(text, ctx)

    def _encode_piece(self, text, ctx):
        if ctx == START:
            return self._native(self._tok, text)
        if ctx == AFTER_SPECIAL and self._sentinel is not None:
            content, sid = self._sentinel
            ids = self._native(self._tok, content + text)
            if not ids or ids[0] != sid:
                raise RuntimeError(f"sentinel {content!r} did not encode to its id {sid} "
                                   f"(tokenizer at {self.source})")
            return ids[1:]
        return self._native(self._bare, text)

    def _decode_piece(self, ids, prefixed):
        return (self._tok if prefixed else self._bare).decode(ids, skip_special_tokens=False)

    def _lookup(self, token):
        return self._tok.token_to_id(token)

    def _backend_id_to_token(self, i):
        tok = self._tok.id_to_token(i)
        if tok is None:
            raise KeyError(f"id {i} is not in the tokenizer at {self.source}")
        return tok

    def _backend_vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)


def _without_prefix_space(node):
    """The tokenizer.json tree with every "add a leading space" step turned off."""
    if isinstance(node, list):
        return [_without_prefix_space(n) for n in node
                if not (isinstance(n, dict) and n.get("type") == "Prepend")
                and not (isinstance(n, dict) and n.get("type") == "Strip"
                         and n.get("content") == " " and n.get("start", 0) > 0)]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if isinstance(v, dict) and v.get("type") == "Prepend":
            v = None
        out[k] = _without_prefix_space(v)
    kind = out.get("type")
    if kind == "Metaspace":
        out["prepend_scheme"] = "never"
        if "add_prefix_space" in out:
            out["add_prefix_space"] = False
    elif kind == "ByteLevel" and "add_prefix_space" in out:
        out["add_prefix_space"] = False
    return out


def load_tokenizer(checkpoint_dir: str, *, prefer: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory: `tokenizer.json` (HF) if present, else
    `tokenizer.model` (SentencePiece). `prefer="sentencepiece"` picks the latter when both
    exist."""
    hf = storage.join(checkpoint_dir, "tokenizer.json")
    sp = storage.join(checkpoint_dir, "tokenizer.model")
    if not storage.isdir(checkpoint_dir):
        raise FileNotFoundError(f"tokenizer directory {checkpoint_dir} does not exist")
    cfg = _CheckpointConfig(checkpoint_dir)
    if storage.exists(sp) and (prefer == "sentencepiece" or not storage.exists(hf)):
        return SentencePieceTokenizer(sp, cfg, source=checkpoint_dir)
    if storage.exists(hf):
        return HFTokenizer(hf, cfg, source=checkpoint_dir)
    raise FileNotFoundError(f"no tokenizer in {checkpoint_dir}: expected tokenizer.json "
                            f"(HF tokenizers) or tokenizer.model (SentencePiece)")
