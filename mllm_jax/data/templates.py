"""Conversation templates and label masks: instruction tuning, and captions for stage 1.

A conversation is LLaVA's format, [{"from": "human" | "gpt", "value": "..."}, ...] (also
"user"/"assistant", and one leading "system" message that replaces the template's system
prompt); messages alternate, starting with the user. "<image>" in a user message marks where
an image goes; there may be several, or none.

Image placement (`image_placement`, an option of every template): "as_written" keeps each
"<image>" where the message has it; "llava" is LLaVA's `preprocess_multimodal`
(llava/train/train.py): a user message holding images becomes its placeholders, a newline
and its text with the placeholders removed and surrounding whitespace stripped
("What is <image> here?" -> "<image>\nWhat is  here?"; a message of images alone is just
the placeholders, without the newline). LLaVA keeps one placeholder per message, since its
samples have one image; here every placeholder of the message is kept, in order, at its
front. LLaVA's `mm_use_im_start_end` and `mmtag` variants wrap the image in extra tokens
and are not reproduced. `plain` renders the images and the caption only, so both
placements give the same example for it. LLaVA tokenizes the text between images piece by
piece (`tokenizer_image_token`), each piece as the start of a text; the whole text tokenized
here, "<image>" a special token, gives the same ids when the tokenizer reads text after a
special token as a new text (transformers' `legacy=True`, as the llava-hf tokenizers do);
with `legacy=False` LLaVA's ids have a dummy-prefix "▁" after each image that these do not.

A template renders a conversation into segments: prompt text (no loss), target text (an
assistant message and the token that ends it: the only text with loss; for `plain`, the
caption and EOS) and images (no loss). Consecutive segments of one kind are joined, so the
only boundaries are where the loss switches on or off and around images; each segment is
tokenized separately (`Tokenizer.encode_segments`, in the context it has in the whole text)
and the pieces are concatenated. Labels copy the ids of target segments and are IGNORE_INDEX
elsewhere, aligned with input_ids as in HF (the loss shifts them). Each image placeholder
becomes its own number of image-token ids.

Tokenization mismatch, detected precisely as follows (`TokenizationMismatch`, naming the
sample id; never a silently masked sample):
  1. the concatenated segment ids must equal `tokenizer.encode` of the whole rendered text
     (BOS as the template says, "<image>" as one image-token id), the tokenization the model
     sees at inference and that HF computes. A difference means a segment boundary is not a
     token boundary in context (a BPE merge across it, a dummy-prefix "▁" or a normalizer that
     strips whitespace there), so the loss span would not be the assistant's tokens;
  2. every target segment must produce tokens and end with the template's end-token id;
  3. no text token may have the image-token id (the model would take it for an image);
  4. the labels must carry loss (before truncation).
Malformed conversations (roles out of order, no assistant turn, images in an assistant turn,
image counts that do not match the placeholders) raise `MalformedConversation`, also naming
the sample.

Truncation keeps the first `max_length` tokens but never cuts through an image: an image that
straddles the limit is removed with everything after it (`num_images` in the result says how
many images are left, so the caller drops the other pixel arrays). A sample with no loss
token left is not an error but a `Dropped` result with a reason, for the caller to count.

Template formats follow the references: `vicuna_v1` and `llama_2` are LLaVA's conv_vicuna_v1
and conv_llava_llama_2; `plain` is LLaVA's stage-1 format (images, then the caption) with EOS
ending the caption (LLaVA's `preprocess_plain` ends it with its separator, "\n"); `llama_3`
and `chatml` (Qwen) are the HF chat templates; `mistral` is "[INST] q [/INST] a</s>" as
mistral-common tokenizes it. BOS is a token id put before the text (so the text starts in
START context), as LLaVA's tokenizer call does, not the string "<s>" some HF chat templates
write. Message values are stripped of surrounding whitespace (LLaVA's formats strip only
the messages that hold an image).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import numpy as np

from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.train.losses import IGNORE_INDEX

IMAGE_PLACEHOLDER = "<image>"
PROMPT, TARGET, IMAGE = "prompt", "target", "image"

# Where a user message's images go (see the module doc).
AS_WRITTEN, LLAVA = "as_written", "llava"
IMAGE_PLACEMENTS = (AS_WRITTEN, LLAVA)

# Reasons a sample is dropped (counted by the caller).
PROMPT_TOO_LONG = "prompt_too_long"  # no loss token within max_length
IMAGE_DOES_NOT_FIT = "image_does_not_fit"  # an image straddles max_length, no loss before it


class SampleError(ValueError):
    """A sample that cannot be turned into an example; names the sample."""

    def __init__(self, sample_id, message):
        super().__init__(f"sample {sample_id!r}: {message}")
        self.sample_id = sample_id


class MalformedConversation(SampleError):
    pass


class TokenizationMismatch(SampleError):
    pass


@dataclasses.dataclass(frozen=True)
class Dropped:
    """A well-formed sample left out on purpose (too long); `reason` is one of the constants
    PROMPT_TOO_LONG, IMAGE_DOES_NOT_FIT."""
    sample_id: object
    reason: str
    detail: str = ""


class Segment(NamedTuple):
    kind: str  # PROMPT, TARGET or IMAGE
    text: str


class Turn(NamedTuple):
    user: str
    assistant: str | None  # None: the prompt for generation


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    # render(system, turns, end, bos) -> segments; `end` ends an assistant turn, `bos` is the
    # tokenizer's BOS string (for templates that repeat it between turns).
    render: Callable[[str | None, list, str, str | None], list]
    default_system: str | None = None
    add_bos: bool = True
    end_token: str | None = None  # None: the tokenizer's EOS
    specials: tuple = ()  # special tokens the template writes (checked against the tokenizer)
    single_turn: bool = False
    image_placement: str = AS_WRITTEN  # one of IMAGE_PLACEMENTS

    def __post_init__(self):
        check_image_placement(self.image_placement)

    def end(self, tokenizer: Tokenizer) -> str:
        end = self.end_token or tokenizer.eos_token
        if end is None:
            raise ValueError(f"template {self.name!r} ends turns with EOS, but the tokenizer at "
                             f"{tokenizer.source} has none")
        return end

    def check_tokenizer(self, tokenizer: Tokenizer):
        needed = list(self.specials) + [self.end(tokenizer)]
        missing = [t for t in needed if not tokenizer.is_special(t)]
        if missing:
            raise ValueError(f"template {self.name!r} needs {missing} as special tokens; the "
                             f"tokenizer at {tokenizer.source} does not have them")


def check_image_placement(value, field: str = "image_placement") -> str:
    """`value` when it is one of IMAGE_PLACEMENTS, else a ValueError naming `field`, the
    value and the choices."""
    if not isinstance(value, str) or value not in IMAGE_PLACEMENTS:
        raise ValueError(f"{field} = {value!r} is not an image placement; choose one of "
                         f"{', '.join(repr(p) for p in IMAGE_PLACEMENTS)}")
    return value


def place_images(text: str, placement: str) -> str:
    """A user message's text with its images placed as `placement` says (module doc)."""
    if placement == AS_WRITTEN or IMAGE_PLACEHOLDER not in text:
        return text
    images = IMAGE_PLACEHOLDER * text.count(IMAGE_PLACEHOLDER)
    return (images + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()


def write_images(conversation, template, image_text: str = IMAGE_PLACEHOLDER,
                 image_placement: str | None = None) -> tuple:
    """(conversation, image_placement) to build with: each user message's images placed as
    the template says and then written as `image_text` (the model's text around one image,
    e.g. "<im_start><image><im_end>"; `registry.image_text`), with "as_written" to keep them
    there. Unchanged when `image_text` is the bare placeholder."""
    if image_text == IMAGE_PLACEHOLDER:
        return conversation, image_placement
    if IMAGE_PLACEHOLDER not in image_text:
        raise ValueError(f"image_text {image_text!r} must hold the placeholder "
                         f"{IMAGE_PLACEHOLDER!r}")
    placement = get_template(template, image_placement).image_placement
    out = []
    for m in conversation:
        role = m.get("from", m.get("role")) if isinstance(m, dict) else None
        if role in ("human", "user") and isinstance(m.get("value"), str):
            text = place_images(m["value"].strip(), placement)
            m = {**m, "value": text.replace(IMAGE_PLACEHOLDER, image_text)}
        out.append(m)
    return out, AS_WRITTEN


def _prompt(text: str) -> list:
    """Prompt text, with its image placeholders as image segments."""
    segs = []
    for k, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            segs.append(Segment(IMAGE, IMAGE_PLACEHOLDER))
        if part:
            segs.append(Segment(PROMPT, part))
    return segs


def _spaced(text: str) -> str:
    return " " + text if text else ""


def _render_plain(system, turns, end, bos):
    (turn,) = turns
    segs = [Segment(IMAGE, IMAGE_PLACEHOLDER)] * turn.user.count(IMAGE_PLACEHOLDER)
    if turn.assistant is not None:
        segs.append(Segment(TARGET, turn.assistant + end))
    return segs


def _render_vicuna_v1(system, turns, end, bos):
    # LLaVA SeparatorStyle.TWO: system + " " + "USER: q" + " " + "ASSISTANT: a" + "</s>" ...
    # The space after "ASSISTANT:" starts the answer's first token ("▁a" / "Ġa"), so it is
    # part of the target.
    segs = _prompt((system or "") + " ")
    for t in turns:
        segs += _prompt(f"USER: {t.user} ASSISTANT:")
        if t.assistant is not None:
            segs.append(Segment(TARGET, _spaced(t.assistant) + end))
    return segs


def _render_llama_2(system, turns, end, bos):
    # LLaVA SeparatorStyle.LLAMA_2 (= Meta's format): [INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{q}
    # [/INST] {a} </s><s>[INST] {q2} [/INST] {a2} </s>
    segs = []
    for k, t in enumerate(turns):
        user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{t.user}" if k == 0 and system else t.user
        segs += _prompt(("" if k == 0 else bos or "") + f"[INST] {user} [/INST]")
        if t.assistant is not None:
            segs.append(Segment(TARGET, _spaced(t.assistant) + " " + end))
    return segs


def _render_mistral(system, turns, end, bos):
    # [INST] {q} [/INST] {a}</s>[INST] {q2} [/INST] {a2}</s>; a system prompt (Mistral has
    # none) goes before the first question, as the HF templates do.
    segs = []
    for k, t in enumerate(turns):
        user = f"{system}\n\n{t.user}" if k == 0 and system else t.user
        segs += _prompt(f"[INST] {user} [/INST]")
        if t.assistant is not None:
            segs.append(Segment(TARGET, _spaced(t.assistant) + end))
    return segs


def _llama_3_header(role):
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _render_llama_3(system, turns, end, bos):
    segs = _prompt(_llama_3_header("system") + system + "<|eot_id|>") if system else []
    for t in turns:
        segs += _prompt(_llama_3_header("user") + t.user + "<|eot_id|>"
                        + _llama_3_header("assistant"))
        if t.assistant is not None:
            segs.append(Segment(TARGET, t.assistant + end))
    return segs


def _render_chatml(system, turns, end, bos):
    segs = _prompt(f"<|im_start|>system\n{system}<|im_end|>\n") if system else []
    for t in turns:
        segs += _prompt(f"<|im_start|>user\n{t.user}<|im_end|>\n<|im_start|>assistant\n")
        if t.assistant is not None:
            segs += [Segment(TARGET, t.assistant + end), Segment(PROMPT, "\n")]
    return segs


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to "
                        "understand the visual content that the user provides, and assist the "
                        "user with a variety of tasks using natural language.")

TEMPLATES = {t.name: t for t in [
    Template("plain", _render_plain, single_turn=True),
    Template("vicuna_v1", _render_vicuna_v1, default_system=VICUNA_SYSTEM),
    Template("llama_2", _render_llama_2, default_system=LLAVA_LLAMA_2_SYSTEM),
    Template("mistral", _render_mistral),
    Template("llama_3", _render_llama_3, end_token="<|eot_id|>",
             specials=("<|start_header_id|>", "<|end_header_id|>")),
    Template("chatml", _render_chatml, default_system="You are a helpful assistant.",
             add_bos=False, end_token="<|im_end|>", specials=("<|im_start|>",)),
]}


def get_template(template, image_placement: str | None = None) -> Template:
    """The template named `template` (or `template` itself, a Template), with
    `image_placement` when given (None: the template's own, "as_written" for a name)."""
    if not isinstance(template, Template):
        if template not in TEMPLATES:
            raise KeyError(f"unknown conversation template {template!r}; known: "
                           f"{sorted(TEMPLATES)}")
        template = TEMPLATES[template]
    if image_placement is not None and image_placement != template.image_placement:
        template = dataclasses.replace(template, image_placement=check_image_placement(
            image_placement))
    return template


# ---- conversations ---------------------------------------------------------------------
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


def parse_conversation(conversation, sample_id=None):
    """(system or None, [Turn]) from LLaVA-format messages; raises MalformedConversation."""
    system, turns, pending = None, [], None
    for k, msg in enumerate(conversation):
        try:
            role, value = _ROLES[msg["from"]], msg["value"]
        except (KeyError, TypeError):
            raise MalformedConversation(sample_id, f"message {k} is not a {{'from': human|gpt|"
                                                   f"system, 'value': str}} dict: {msg!r}"
                                       ) from None
        if not isinstance(value, str):
            raise MalformedConversation(sample_id, f"message {k} has a non-string value")
        value = value.strip()
        if role == "system":
            if k != 0:
                raise MalformedConversation(sample_id, f"system message at position {k}")
            system = value
        elif role == "user":
            if pending is not None:
                raise MalformedConversation(sample_id, f"two user messages in a row at {k}")
            pending = value
        else:
            if pending is None:
                raise MalformedConversation(sample_id, f"assistant message {k} does not follow "
                                                       f"a user message")
            if IMAGE_PLACEHOLDER in value:
                raise MalformedConversation(sample_id, f"assistant message {k} holds an image")
            turns.append(Turn(pending, value))
            pending = None
    if pending is not None:
        turns.append(Turn(pending, None))
    if not turns:
        raise MalformedConversation(sample_id, "no user message")
    return system, turns


def _render(conversation, template, tokenizer, system, sample_id, generation,
            image_placement):
    tpl = get_template(template, image_placement)
    tpl.check_tokenizer(tokenizer)
    own_system, turns = parse_conversation(conversation, sample_id)
    turns = [Turn(place_images(t.user, tpl.image_placement), t.assistant) for t in turns]
    if generation:
        if turns[-1].assistant is not None:
            raise MalformedConversation(sample_id, "a generation prompt must end with a user "
                                                   "message")
    elif turns[-1].assistant is None:
        raise MalformedConversation(sample_id, "the conversation ends with a user message "
                                               "that has no answer")
    if tpl.single_turn and len(turns) != 1:
        raise MalformedConversation(sample_id, f"template {tpl.name!r} takes one exchange "
                                               f"(image, caption), got {len(turns)}")
    if own_system is not None:
        system = own_system
    elif system is None:
        system = tpl.default_system
    return tpl, tpl.render(system, turns, tpl.end(tokenizer), tokenizer.bos_token)


def render_text(conversation, template, tokenizer, *, system=None, generation=False,
                image_placement: str | None = None) -> str:
    """The text a conversation renders to, "<image>" placeholders included (BOS, when the
    template adds one, is an id in front of it, not part of the text)."""
    _, segments = _render(conversation, template, tokenizer, system, None, generation,
                          image_placement)
    return "".join(s.text for s in segments)


def _merge(segments):
    """Joins consecutive prompt (or target) segments; images stay one segment each."""
    out = []
    for s in segments:
        if out and s.kind == out[-1].kind and s.kind != IMAGE:
            out[-1] = Segment(s.kind, out[-1].text + s.text)
        else:
            out.append(s)
    return out


def _image_counts(per_image, n_images, sample_id):
    if isinstance(per_image, (int, np.integer)):
        counts = [int(per_image)] * n_images
    else:
        counts = [int(c) for c in per_image]
        if len(counts) != n_images:
            raise MalformedConversation(sample_id, f"{n_images} {IMAGE_PLACEHOLDER} "
                                                   f"placeholders but {len(counts)} image "
                                                   f"token counts")
    if any(c < 1 for c in counts):
        raise ValueError(f"image token counts must be positive, got {counts}")
    return counts


def _tokens(tokenizer, i):
    try:
        return tokenizer.id_to_token(i)
    except (KeyError, IndexError, ValueError, TypeError):
        return str(i)


def _tokenize(segments, tpl, tokenizer, image_token_id, sample_id):
    """Per-segment ids (after the BOS ids), with the mismatch checks of the module doc."""
    placeholder = {IMAGE_PLACEHOLDER: image_token_id}
    pieces = tokenizer.encode_segments([s.text for s in segments], extra_special=placeholder)
    bos = [tokenizer.bos_id] if tpl.add_bos and tokenizer.bos_id is not None else []
    flat = bos + [i for p in pieces for i in p]
    whole = tokenizer.encode("".join(s.text for s in segments), add_bos=bool(bos),
                             extra_special=placeholder)
    if flat != whole:
        d = next((k for k, (a, b) in enumerate(zip(flat, whole)) if a != b),
                 min(len(flat), len(whole)))
        start, where = len(bos), "BOS"
        for k, (s, p) in enumerate(zip(segments, pieces)):
            if start + len(p) > d:
                where = f"{s.kind} segment ending {s.text[-40:]!r}"
                if k + 1 < len(segments):
                    nxt = segments[k + 1]
                    where += f", before the {nxt.kind} segment {nxt.text[:40]!r}"
                break
            start += len(p)
        lo = max(0, d - 3)
        raise TokenizationMismatch(
            sample_id, f"template {tpl.name!r}: tokenizing the segments separately gives "
            f"{[_tokens(tokenizer, i) for i in flat[lo:d + 4]]} from token {lo}, but the "
            f"whole text gives {[_tokens(tokenizer, i) for i in whole[lo:d + 4]]} (first "
            f"difference at token {d}, in the {where})")
    end_id = tokenizer.token_id(tpl.end(tokenizer))
    for s, p in zip(segments, pieces):
        if s.kind == TARGET and (not p or p[-1] != end_id):
            raise TokenizationMismatch(sample_id, f"target {s.text[:60]!r} does not end with "
                                                  f"the end token id {end_id}: {p[-4:]}")
        if s.kind == IMAGE and p != [image_token_id]:
            raise TokenizationMismatch(sample_id, f"image placeholder gave {p}")
        if s.kind != IMAGE and image_token_id in p:
            raise TokenizationMismatch(sample_id, f"text {s.text[:60]!r} encodes to the image "
                                                  f"token id {image_token_id}")
    return bos, pieces


def _assemble(conversation, template, tokenizer, image_tokens_per_image, image_token_id,
              system, sample_id, generation, image_placement):
    if image_token_id is None:
        image_token_id = tokenizer.image_token_id
    elif tokenizer.image_token_id is not None and tokenizer.image_token_id != image_token_id:
        raise ValueError(f"image_token_id {image_token_id} differs from the tokenizer's "
                         f"{tokenizer.image_token!r} = {tokenizer.image_token_id} "
                         f"({tokenizer.source})")
    tpl, segments = _render(conversation, template, tokenizer, system, sample_id, generation,
                            image_placement)
    segments = _merge(segments)
    n_images = sum(s.kind == IMAGE for s in segments)
    if n_images and image_token_id is None:
        raise ValueError(f"sample {sample_id!r} has images but no image_token_id was given and "
                         f"the tokenizer at {tokenizer.source} has none")
    counts = _image_counts(image_tokens_per_image, n_images, sample_id)
    bos, pieces = _tokenize(segments, tpl, tokenizer, image_token_id, sample_id)
    ids, labels, spans = list(bos), [IGNORE_INDEX] * len(bos), []
    images = iter(counts)
    for s, p in zip(segments, pieces):
        if s.kind == IMAGE:
            n = next(images)
            spans.append((len(ids), len(ids) + n))
            ids += [image_token_id] * n
            labels += [IGNORE_INDEX] * n
        else:
            ids += p
            labels += p if s.kind == TARGET else [IGNORE_INDEX] * len(p)
    return ids, labels, spans


def build_example(conversation, template, tokenizer: Tokenizer, *,
                  image_tokens_per_image: int | Sequence[int], max_length: int, sample_id,
                  image_token_id: int | None = None, system: str | None = None,
                  image_placement: str | None = None):
    """One training example, or `Dropped` when no loss token fits in `max_length`.

    Returns {"input_ids", "labels"} (int32 arrays, at most max_length long), "num_images"
    (images whose tokens are kept), "truncated" and "sample_id". `image_tokens_per_image` is
    the number of image features per image (one int, or one per placeholder, in order);
    `image_token_id` defaults to the tokenizer's (from the checkpoint config). `system`
    replaces the template's system prompt unless the conversation has its own.
    `image_placement` (one of IMAGE_PLACEMENTS; None: the template's own) says where a
    user message's images go (module doc).
    """
    ids, labels, spans = _assemble(conversation, template, tokenizer, image_tokens_per_image,
                                   image_token_id, system, sample_id, generation=False,
                                   image_placement=image_placement)
    if all(x == IGNORE_INDEX for x in labels[1:]):
        raise TokenizationMismatch(sample_id, "labels are fully masked")
    truncated = len(ids) > max_length
    cut = min(len(ids), max_length)
    for s, e in spans:
        if s < cut < e:
            cut = s
            break
    if all(x == IGNORE_INDEX for x in labels[1:cut]):
        first = next(k for k, x in enumerate(labels) if k and x != IGNORE_INDEX)
        reason = IMAGE_DOES_NOT_FIT if cut < max_length else PROMPT_TOO_LONG
        return Dropped(sample_id, reason, f"{len(ids)} tokens ({sum(e - s for s, e in spans)} "
                                          f"for {len(spans)} images), first loss token at "
                                          f"{first}, max_length {max_length}")
    return {
        "input_ids": np.asarray(ids[:cut], np.int32),
        "labels": np.asarray(labels[:cut], np.int32),
        "num_images": sum(e <= cut for s, e in spans),
        "truncated": truncated,
        "sample_id": sample_id,
    }


def build_prompt(conversation, template, tokenizer: Tokenizer, *,
                 image_tokens_per_image: int | Sequence[int], image_token_id: int | None = None,
                 system: str | None = None, sample_id=None,
                 image_placement: str | None = None) -> np.ndarray:
    """Input ids for generation: the conversation (ending with a user message) followed by
    the assistant's header. They equal the prompt part of `build_example`'s input_ids
    (with the same `image_placement`)."""
    ids, _, _ = _assemble(conversation, template, tokenizer, image_tokens_per_image,
                          image_token_id, system, sample_id, generation=True,
                          image_placement=image_placement)
    return np.asarray(ids, np.int32)
