"""A plain-Python input pipeline for LLaVA-format records, with grain's iterator interface.

Order. Epoch e visits the records in the permutation `np.random.default_rng([seed, e])` of
their indices; process i of n takes elements i, i + n, i + 2n, ... of it, so processes see
disjoint records within an epoch and together see all of them. Batches may span epochs.

Samples. Each record is checked and turned into an example (`build_example`) in order; a bad
record is skipped and the next one fills its slot. Nothing bad is silent: each bad record is
counted by reason (`report()`), and with a workdir appended, as {sample_id, reason, detail,
index, epoch}, to `data_report.jsonl`, with the counts in `data_report.json` (multi-process
runs write `data_report.process{i}.*`, one pair per process). A record found bad is
remembered and skipped without re-reading in later epochs, and counted once.

Parallelism. Images are decoded and preprocessed by a thread pool (PIL releases the GIL)
that runs ahead of the consumer by a window of records; results are consumed in order, so
batches do not depend on num_workers or timing. Text (templates, tokenization) runs on the
consumer thread: the tokenizer wrappers keep lazy caches and are not meant to be shared.

State. `get_state()` is {epoch, position (in this process's order), seed, process
layout, num_records, bad records}: JSON-able. `set_state` discards the read-ahead and resumes
exactly there, so the batches after a restore equal those an uninterrupted run yields; the
report files are rewritten to hold only what the restored state had seen.

Batches (numpy, this process's rows of the global batch): input_ids [B, max_length] int32
(pad id), attention_mask [B, max_length] int32, labels [B, max_length] int32 (IGNORE_INDEX
on padding), pixel_values [B, max_images, H, W, 3] float32 (a sample's images first, zeros
after). `return_sample_ids=True` adds "sample_ids" (numpy str array; not for the device);
`last_sample_ids` always holds those of the latest batch.

Images are paths, or in-memory image files (objects with `.path` and `.data` bytes, e.g. the
`ImageBytes` of `tfds_builders.records_from_tfds`), so TFDS records feed the pipeline as they
are.

Images whose token count depends on their size (a `sized` family's `image_inputs`, e.g.
LLaVA-NeXT's anyres views): each image is encoded by `image_inputs.encode`, its token count
(`tokens_of`) expands its placeholder, and `image_inputs.collate` lays out the batch's images
(LLaVA-NeXT: pixel_values [B, max_images, max_views, H, W, 3] and image_sizes
[B, max_images, 2]); mode "lm" only, not packed.

Preference pairs. `mode="dpo"` reads records {id, images, prompt, chosen, rejected} (the
prompt is the user turn, chosen and rejected the assistant's answers, labels on the answers
only) and yields chosen_{input_ids, attention_mask, labels}, rejected_{...} and pixel_values
(shared by the pair), the batch of `train.step.dpo_objective`.

Packing. `packing=True` (data.packing) fills each row with several whole samples (modes lm
and dpo; see `data.packing`): segment_ids and position_ids join the batch, pixel_values holds
`row_images` images per row (the row's, in sample order), a batch still has
`global_batch_size` rows, so a step sees more samples. Examples that fit no row are carried
to the next batch; the state lists them ("carry", record indices) and `set_state` rebuilds
them, so a restore still yields the batches of an uninterrupted run. "sample_ids" is then
[rows, samples per row] ("" where a row holds fewer) and `last_sample_ids` lists the batch's
samples row by row.

Mixtures. `MixturePipeline` draws each sample from one of several sources (pipelines read
example by example with `next_example`) with given weights; see `data.mixture` (its names
are importable from here too). Batches are assembled by `data.collate.collate`.

Untrusted input. Image paths outside the image root arrive as `llava_json.RefusedImage`
(reason `outside_root`); images more elongated than the image config's max_aspect_ratio or
larger than PIL's MAX_IMAGE_PIXELS are skipped (`image_aspect_ratio`, `image_too_large`);
text UTF-8 cannot hold (a lone surrogate) is skipped as `text_not_encodable` before the
tokenizer sees it. All are counted and listed like the other bad records.
"""
from __future__ import annotations

import collections
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from mllm_jax import storage
from mllm_jax.data import image as image_lib
from mllm_jax.data import packing as packing_lib
from mllm_jax.data import pairs
from mllm_jax.data import templates as T
from mllm_jax.data.collate import collate
# Mixtures have their own module; their names stay importable from here.
from mllm_jax.data.mixture import MixturePipeline, mixture_choices  # noqa: F401
# A record's checks have their own module; their names stay importable from here.
from mllm_jax.data.record_checks import (  # noqa: F401
    EMPTY_TEXT, IMAGE_ASPECT_RATIO, IMAGE_COUNT_MISMATCH, IMAGE_TOO_LARGE,
    MALFORMED_CONVERSATION, MISSING_IMAGE, OUTSIDE_ROOT, REASONS, TEXT_NOT_ENCODABLE,
    TOKENIZATION_MISMATCH, TOO_MANY_IMAGES, UNREADABLE_IMAGE, Bad, check_conversation,
    decode_images, fixed_image_shape, preference_conversations)

MODES = ("lm", "dpo", "image_text")  # image_text: one image and its caption (data.pairs)


class _Pending(NamedTuple):
    epoch: int
    position: int
    index: int
    images: object  # a Future of the decoded images, or None (no images / known bad)


class LlavaPipeline:
    def __init__(self, records, tokenizer, image_cfg, template, *,
                 global_batch_size: int | None = None, max_length: int, max_images: int,
                 image_tokens_per_image: int, image_token_id: int | None = None, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, num_workers: int = 2,
                 workdir=None, system: str | None = None, return_sample_ids: bool = False,
                 mode: str = "lm", report_name: str = "data_report", sample_inputs=None,
                 packing: bool = False, packing_images: int = 0,
                 image_placement: str | None = None, image_inputs=None,
                 image_text: str = T.IMAGE_PLACEHOLDER):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        # A sized family's image inputs (`registry.image_inputs`), or None: fixed-shape images.
        self.image_inputs = image_inputs if image_inputs is not None and image_inputs.sized \
            else None
        if self.image_inputs is not None and (mode != "lm" or packing):
            raise ValueError(f"images whose token count depends on their size (this model's "
                             f"anyres views) are batched for the lm objective, not packed; "
                             f"got mode {mode!r}, packing={bool(packing)}")
        _check_packing(packing, mode, sample_inputs)
        self.packing = bool(packing)
        if sample_inputs is not None and mode != "lm":
            raise ValueError(f"this model reads per-sample inputs {list(sample_inputs.keys)} "
                             f"(InstructBLIP's instruction), which batches of mode {mode!r} do "
                             "not carry: train it with the lm objective")
        self.mode = mode
        # Builder of the model's per-sample inputs (`registry.sample_inputs`), or None.
        self.sample_inputs = sample_inputs
        if global_batch_size is None:  # only read example by example (a mixture's source)
            global_batch_size = process_count
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} does not split over "
                             f"{process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.records = list(records)
        if len(self.records) < process_count:
            raise ValueError(f"{len(self.records)} records cannot feed {process_count} "
                             f"processes")
        self.tokenizer = tokenizer
        self.image_cfg = image_lib.as_image_config(image_cfg)
        self.image_shape = fixed_image_shape(self.image_cfg) if self.image_inputs is None else None
        # image_placement None: the template's own (templates.IMAGE_PLACEMENTS)
        self.template = T.get_template(template, image_placement)
        # How the model's prompts write one image (`registry.image_text`).
        self.image_text = image_text
        if mode == "image_text":  # captions alone, in the Q-Former's tokenizer; no template
            self._specials = pairs.special_ids(tokenizer)
            self._image_ids = pairs.image_index(self.records)
        else:
            self.template.check_tokenizer(tokenizer)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.max_length = max_length
        self.max_images = max_images
        self.image_tokens_per_image = image_tokens_per_image
        # Images per row of a batch: a packed row holds several samples' images.
        self.row_images = packing_lib.row_image_capacity(
            max_length, max_images, image_tokens_per_image, packing_images) if packing \
            else max_images
        self.image_token_id = image_token_id if image_token_id is not None \
            else tokenizer.image_token_id
        self.system = system
        self.seed = int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.return_sample_ids = return_sample_ids
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.pad_id = int(pad if pad is not None else 0)
        # Every epoch gives this process the same number of records.
        self.local_len = len(range(process_index, len(self.records), process_count))
        self.num_workers = int(num_workers)
        self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="llava-data") \
            if self.num_workers > 0 else None
        self._window = self.local_batch_size + 4 * max(self.num_workers, 1)
        self._orders = {}
        self.workdir = os.fspath(workdir) if workdir is not None else None
        suffix = "" if process_count == 1 else f".process{process_index}"
        if self.workdir is not None:
            storage.makedirs(self.workdir)
            self._jsonl = storage.join(self.workdir, f"{report_name}{suffix}.jsonl")
            self._json = storage.join(self.workdir, f"{report_name}{suffix}.json")
        self.last_sample_ids = []
        self._reset(epoch=0, position=0, bad={})

    # ---- order and state ------------------------------------------------------------------
    def local_order(self, epoch: int) -> np.ndarray:
        """Record indices this process visits in `epoch`, in order."""
        if epoch not in self._orders:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
            self._orders[epoch] = perm[self.process_index::self.process_count]
            for old in [e for e in self._orders if e < epoch - 1]:
                del self._orders[old]
        return self._orders[epoch]

    def _reset(self, epoch, position, bad):
        for p in getattr(self, "_pending", ()):
            if p.images is not None:
                p.images.cancel()
        self._epoch, self._position = epoch, position
        self._cursor = (epoch, position)  # next record to read ahead
        self._pending = collections.deque()
        self._bad = dict(bad)  # record index -> reason
        self._carry = []  # packing: examples read but not yet placed in a row
        # The report files are brought in line with the state before the first batch (a
        # new pipeline must not wipe them before a set_state that restores what they hold).
        self._report_synced = False

    def get_state(self) -> dict:
        state = {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                 "process_index": self.process_index, "process_count": self.process_count,
                 "num_records": len(self.records),
                 "bad": [[int(i), r] for i, r in sorted(self._bad.items())]}
        if self.packing:
            state.update(packing=True, carry=[int(ex["record_index"]) for ex in self._carry])
        return state

    def set_state(self, state: dict):
        mine = {"seed": self.seed, "process_index": self.process_index,
                "process_count": self.process_count, "num_records": len(self.records)}
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise ValueError(f"data state was saved with {key}={state[key]}, this "
                                 f"pipeline has {value}")
        position = int(state["position"])
        if not 0 <= position < self.local_len:
            raise ValueError(f"data state position {position} outside [0, {self.local_len})")
        if bool(state.get("packing", False)) != self.packing:
            raise ValueError(f"data state was saved with packing={bool(state.get('packing'))}"
                             f", this pipeline has packing={self.packing} (data.packing)")
        self._reset(int(state["epoch"]), position,
                    {int(i): r for i, r in state.get("bad", [])})
        self._carry = [self._rebuild(int(i)) for i in state.get("carry", [])]

    def _rebuild(self, index: int) -> dict:
        """The example of record `index` (a carried example of a saved state), read again."""
        record = self.records[index]
        images = _Done(decode_images(record.images, self.image_cfg, self.image_inputs)) \
            if record.images else None
        ex = self._example(record, images)
        if isinstance(ex, Bad):
            raise ValueError(f"data state carries sample {record.id!r} (record {index}) into "
                             f"the next batch, but it now reads as bad ({ex.reason}: "
                             f"{ex.detail}); its data changed since the checkpoint")
        ex["record_index"] = index
        return ex

    def report(self) -> dict:
        """Bad records seen by this process, counted by reason (each record once)."""
        return dict(sorted(collections.Counter(self._bad.values()).items()))

    # ---- iteration ------------------------------------------------------------------------
    def __iter__(self):
        return self

    def _advance(self, epoch, position):
        position += 1
        return (epoch + 1, 0) if position == self.local_len else (epoch, position)

    def _fill(self):
        while len(self._pending) < self._window:
            epoch, position = self._cursor
            index = int(self.local_order(epoch)[position])
            paths = self.records[index].images
            future = None
            if paths and index not in self._bad and len(paths) <= self.max_images:
                if self._executor is None:
                    future = _Done(decode_images(paths, self.image_cfg, self.image_inputs))
                else:
                    future = self._executor.submit(decode_images, paths, self.image_cfg,
                                                   self.image_inputs)
            self._pending.append(_Pending(epoch, position, index, future))
            self._cursor = self._advance(epoch, position)

    def _build(self, conversations, n_images, sample_id, image_tokens=None):
        """`build_example` of one conversation, or a `Bad`; `image_tokens`: each image's
        token count (default: `image_tokens_per_image` each)."""
        bad = check_conversation(conversations, n_images, sample_id)
        if bad:
            return bad
        if n_images > self.max_images:
            return Bad(TOO_MANY_IMAGES, f"{n_images} images, max_images {self.max_images}")
        try:
            conversations, placement = T.write_images(conversations, self.template,
                                                      self.image_text)
            ex = T.build_example(conversations, self.template, self.tokenizer,
                                 image_placement=placement,
                                 image_tokens_per_image=(self.image_tokens_per_image
                                                         if image_tokens is None
                                                         else image_tokens),
                                 max_length=self.max_length, sample_id=sample_id,
                                 image_token_id=self.image_token_id, system=self.system)
        except T.TokenizationMismatch as e:
            return Bad(TOKENIZATION_MISMATCH, str(e))
        except T.MalformedConversation as e:
            return Bad(MALFORMED_CONVERSATION, str(e))
        if isinstance(ex, T.Dropped):
            return Bad(ex.reason, ex.detail)
        return ex

    def _example(self, record, image_future):
        """The example of one record (with "pixels" and "sample_id"), or a `Bad`.

        mode "lm": {"input_ids", "labels", ...} of the record's conversation (a preference
        record gives prompt + chosen). mode "dpo": {"chosen": ex, "rejected": ex} of a
        preference record (the prompt is the user turn, each answer the assistant's)."""
        n_images = len(record.images)
        if self.mode == "image_text":
            return self._pair_example(record, image_future)
        if self.mode == "dpo":
            pair = preference_conversations(record)
            if isinstance(pair, Bad):
                return pair
            ex = {}
            for side, conv in zip(("chosen", "rejected"), pair):
                built = self._build(conv, n_images, record.id)
                if isinstance(built, Bad):
                    return Bad(built.reason, f"{side}: {built.detail}")
                ex[side] = built
            n_kept = ex["chosen"]["num_images"]
            if ex["rejected"]["num_images"] != n_kept:
                return Bad(T.IMAGE_DOES_NOT_FIT, "chosen and rejected keep different numbers "
                                                 "of images within max_length")
        else:
            conversations = getattr(record, "conversations", None)
            if conversations is None and hasattr(record, "prompt"):
                pair = preference_conversations(record)
                if isinstance(pair, Bad):
                    return pair
                conversations = pair[0]
            image_tokens = None
            if self.image_inputs is not None and n_images:
                # The token counts come from the decoded images.
                if n_images > self.max_images:
                    return Bad(TOO_MANY_IMAGES, f"{n_images} images, max_images "
                                                f"{self.max_images}")
                for p in image_future.result():
                    if isinstance(p, Bad):
                        return p
                image_tokens = [self.image_inputs.tokens_of(p) for p in image_future.result()]
            ex = self._build(conversations, n_images, record.id, image_tokens)
            if isinstance(ex, Bad):
                return ex
            n_kept = ex["num_images"]
            if self.sample_inputs is not None:
                ex["model_inputs"] = self.sample_inputs.encode(conversations, record.id)
        pixels = image_future.result()[:n_kept] if n_kept else []
        for p in pixels:
            if isinstance(p, Bad):
                return p
        ex["pixels"] = pixels
        ex["sample_id"] = record.id
        return ex

    def _pair_example(self, record, image_future):
        """mode "image_text": {"input_ids", "pixels", "image_id", "sample_id"} or a `Bad`."""
        if len(record.images) != 1:
            return Bad(IMAGE_COUNT_MISMATCH, f"{len(record.images)} images; an image-caption "
                                             "pair has one")
        caption = pairs.caption_of(record)
        if isinstance(caption, tuple):
            return Bad(*caption)
        pixels = image_future.result()
        if isinstance(pixels[0], Bad):
            return pixels[0]
        return {"input_ids": pairs.caption_ids(caption, self.tokenizer, self.max_length,
                                               self._specials),
                "pixels": pixels, "image_id": self._image_ids[pairs.image_key(record.images[0])],
                "sample_id": record.id}

    def _record_bad(self, pending: _Pending, bad: Bad):
        if pending.index in self._bad:
            return
        self._bad[pending.index] = bad.reason
        if self.workdir is None:
            return
        record = self.records[pending.index]
        line = {"sample_id": record.id, "reason": bad.reason, "detail": bad.detail,
                "index": pending.index, "epoch": pending.epoch,
                "process_index": self.process_index}
        text = json.dumps(line, default=str) + "\n"
        if storage.is_remote(self._jsonl):
            # An object store has no append: the report (a line per bad record) is rewritten.
            old = storage.read_text(self._jsonl) if storage.exists(self._jsonl) else ""
            storage.write_atomic(self._jsonl, old + text)
        else:
            with open(self._jsonl, "a", encoding="utf-8") as f:
                f.write(text)
        self._write_counts()

    def next_example(self) -> dict:
        """The next usable example of this process's order (see `_example`), skipping (and
        reporting) bad records; the state advances past every record read."""
        if self.workdir is not None and not self._report_synced:
            self._rewrite_report()
        self._report_synced = True
        misses = 0
        while True:
            self._fill()
            p = self._pending.popleft()
            self._epoch, self._position = self._advance(p.epoch, p.position)
            record = self.records[p.index]
            if p.index in self._bad:
                result = Bad(self._bad[p.index], "")
            else:
                result = self._example(record, p.images)
            if isinstance(result, Bad):
                self._record_bad(p, result)
                misses += 1
                if misses > self.local_len:
                    raise RuntimeError(f"no usable record in a whole epoch of process "
                                       f"{self.process_index}: {self.report()}")
                continue
            result["record_index"] = p.index
            return result

    def __next__(self) -> dict:
        if self.packing:
            return self._next_packed()
        rows = [self.next_example() for _ in range(self.local_batch_size)]
        ids = [ex["sample_id"] for ex in rows]
        self.last_sample_ids = ids
        return self._batch(rows, ids)

    def _next_packed(self) -> dict:
        rows, self._carry = packing_lib.pack(
            self._carry, self.next_example, rows=self.local_batch_size, mode=self.mode,
            max_length=self.max_length, max_images=self.row_images)
        self.last_sample_ids = [ex["sample_id"] for row in rows for ex in row]
        return packing_lib.collate_packed(
            rows, self.mode, max_length=self.max_length, max_images=self.row_images,
            image_shape=self.image_shape, pad_id=self.pad_id,
            sample_ids=self.return_sample_ids)

    def _batch(self, rows, ids) -> dict:
        if self.mode == "image_text":
            return pairs.collate_pairs(rows, batch_size=self.local_batch_size,
                                       max_length=self.max_length,
                                       image_shape=self.image_shape, pad_id=self._specials[2],
                                       sample_ids=ids if self.return_sample_ids else None)
        return collate(rows, self.mode, batch_size=self.local_batch_size,
                       max_length=self.max_length, max_images=self.max_images,
                       image_shape=self.image_shape, pad_id=self.pad_id,
                       sample_ids=ids if self.return_sample_ids else None,
                       sample_inputs=self.sample_inputs, image_inputs=self.image_inputs)

    # ---- report files ---------------------------------------------------------------------
    def _write_counts(self):
        storage.write_atomic(self._json, json.dumps(
            {"counts": self.report(), "total": len(self._bad),
             "num_records": len(self.records), "process_index": self.process_index,
             "process_count": self.process_count}, indent=1))

    def _rewrite_report(self):
        """Keep only the lines of bad records the current state knows (after a restore, those
        found later are found, and written, again)."""
        kept, seen = [], set()
        if storage.exists(self._jsonl):
            with storage.open_file(self._jsonl, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash
                    i = entry.get("index")
                    if i in self._bad and i not in seen:
                        seen.add(i)
                        kept.append(line if line.endswith("\n") else line + "\n")
        storage.write_atomic(self._jsonl, "".join(kept))
        self._write_counts()

    def close(self):
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_packing(packing, mode, sample_inputs):
    """Packing works on lm and dpo examples of models without per-sample inputs."""
    if not packing:
        return
    if mode not in packing_lib.SIDES:
        raise ValueError(f"data.packing packs lm and dpo samples; mode {mode!r} (image-caption "
                         "pairs for contrastive objectives) is not packed: set data.packing "
                         "to False")
    if sample_inputs is not None:
        raise ValueError(f"data.packing: this model reads per-sample inputs "
                         f"{list(sample_inputs.keys)} (one per image, InstructBLIP's "
                         "instruction), which packed rows do not carry: set data.packing to "
                         "False")


class _Done:
    """A finished result with the Future interface used above (num_workers=0)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def cancel(self):
        return False


