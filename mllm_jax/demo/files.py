"""The shapes world on disk: `write_dataset` writes the PNGs, the LLaVA-format JSON files
and the text corpus of a build and trains its SentencePiece tokenizer (`train_tokenizer`);
`read_pairs` reads a pairs file back for contrastive pre-training.

    paths = write_dataset("shapes_data", {"train": 1000, "val": 100}, seed=0)
    tok = load_tokenizer(paths["tokenizer"])  # mllm_jax.data.tokenizer
"""
from __future__ import annotations

import json
import os

from PIL import Image

from mllm_jax.demo.captions import object_phrase, short_caption
from mllm_jax.demo.questions import fewshot_episode, statistics
from mllm_jax.demo.records import (caption_record, corpus_lines, eval_records, instruct_record,
                                   preference_record, yesno_preference_record)
from mllm_jax.demo.scenes import STREAM_FEWSHOT, World, image_path, make_split, scene_rng


def _dump(obj, path):
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))  # the C encoder
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_dataset(out_dir, sizes=None, seed: int = 0, world: World = World(), *,
                  turns: int = 3, weights: dict | None = None, fewshot_fraction: float = 0.05,
                  fewshot_k: int = 2, tokenizer_vocab_size: int | None = 512) -> dict:
    """Writes the world under `out_dir`: images/{split}/NNNNNN.png and, per split,
    captions_{split}.json (stage 1), instruct_{split}.json (stage 2: `turns` questions a
    record, of kinds drawn by `weights` (default INSTRUCT_WEIGHTS), plus few-shot episodes for
    `fewshot_fraction` of the scenes), preference_{split}.json (DPO on detailed captions),
    preference_yesno_{split}.json (DPO on existence questions), pairs_{split}.json
    ({id, image, caption, regions}: the faithful short caption and each object's box and
    phrase, for contrastive pre-training), eval_{split}.json (every split but train);
    text_corpus.txt (from the train split, else the first), world.json, and a tokenizer
    trained on the corpus in tokenizer/ (unless `tokenizer_vocab_size` is None). POPE
    statistics are those of the split itself. Returns {name: path}."""
    sizes = dict(sizes or {"train": 10000, "val": 500, "test": 500})
    out_dir = os.fspath(out_dir)
    paths = {}
    corpus_split = "train" if "train" in sizes else next(iter(sizes))
    for split, n in sizes.items():
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        scenes = make_split(split, n, seed, world)
        stats = statistics(scenes, world)
        for scene in scenes:
            Image.fromarray(scene.image).save(os.path.join(out_dir, image_path(scene.id)))
        captions, instruct, prefs, yesno, pairs = [], [], [], [], []
        for i, scene in enumerate(scenes):
            captions.append(caption_record(scene, seed, split, i, world))
            yesno.append(yesno_preference_record(scene, seed, split, i, world, stats))
            instruct.append(instruct_record(scene, seed, split, i, world, stats, turns,
                                            weights))
            pref = preference_record(scene, seed, split, i, world, stats)
            if pref is not None:
                prefs.append(pref)
            pairs.append({"id": scene.id, "image": image_path(scene.id),
                          "caption": short_caption(scene.objects, None, world),
                          "regions": [{"box": list(o.bbox), "phrase": object_phrase(o)}
                                      for o in scene.objects]})
            rng = scene_rng(seed, split, i, STREAM_FEWSHOT)
            if len(scenes) > fewshot_k and rng.random() < fewshot_fraction:
                ep = fewshot_episode(scenes, i, fewshot_k, rng, world, stats)
                instruct.append({"id": f"{scene.id}-fewshot",
                                 "image": [image_path(s) for s in ep["images"]],
                                 "conversations": ep["conversations"], "kinds": ["fewshot"],
                                 "hallucinated": []})
        files = {"captions": captions, "instruct": instruct, "preference": prefs,
                 "preference_yesno": yesno, "pairs": pairs}
        if split != "train":
            files["eval"] = eval_records(scenes, seed, split, world, stats, fewshot_k)
        for name, data in files.items():
            paths[f"{name}_{split}"] = os.path.join(out_dir, f"{name}_{split}.json")
            _dump(data, paths[f"{name}_{split}"])
        if split == corpus_split:
            paths["text_corpus"] = os.path.join(out_dir, "text_corpus.txt")
            with open(paths["text_corpus"], "w", encoding="utf-8") as f:
                f.write("\n".join(corpus_lines(scenes, seed, split, world, stats)) + "\n")
    paths["world"] = os.path.join(out_dir, "world.json")
    _dump({"seed": seed, "sizes": sizes, **world.to_dict()}, paths["world"])
    if tokenizer_vocab_size:
        paths["tokenizer"] = train_tokenizer(paths["text_corpus"],
                                             os.path.join(out_dir, "tokenizer"),
                                             vocab_size=tokenizer_vocab_size)
    return paths


def read_pairs(path, image_root=None, *, regions: bool = False) -> list:
    """(image path, caption) pairs of a pairs_{split}.json file; paths joined to
    `image_root` (default: the file's directory). With `regions`, (image path, caption,
    regions) triples, regions a list of ((x0, y0, x1, y1) box in pixels, phrase)."""
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    out = []
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) \
                or not isinstance(e.get("caption"), str):
            raise ValueError(f"{path}: entry {k} is not {{id, image: str, caption: str}}")
        item = (os.path.join(root, e["image"]), e["caption"])
        if regions:
            if not isinstance(e.get("regions"), list):
                raise ValueError(f"{path}: entry {k} ({e.get('id')}) has no regions list; "
                                 f"rebuild the data with shapes.write_dataset")
            try:
                item += ([(tuple(int(v) for v in r["box"]), str(r["phrase"]))
                          for r in e["regions"]],)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: entry {k} ({e.get('id')}): a region is not "
                                 f"{{box: [x0, y0, x1, y1], phrase}}: {err}") from err
        out.append(item)
    return out


# ---- tokenizer ---------------------------------------------------------------------------
SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
IMAGE_TOKEN = "<image>"


def train_tokenizer(corpus_path, out_dir, vocab_size: int = 512) -> str:
    """Trains a SentencePiece BPE model on the corpus (LLaMA-style: byte fallback, digits
    split, no normalization, dummy prefix; ids <unk> 0, <s> 1, </s> 2, <pad> 3, <image> 4),
    deterministically (one thread, no sampling or shuffling). Writes tokenizer.model and
    tokenizer_config.json / special_tokens_map.json into `out_dir` (a checkpoint tokenizer
    `load_tokenizer(out_dir)` reads) and returns `out_dir`."""
    import sentencepiece as spm

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=os.fspath(corpus_path), model_prefix=os.path.join(out_dir, "tokenizer"),
            vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
            user_defined_symbols=[IMAGE_TOKEN], num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, max_sentence_length=1 << 14, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"training a {vocab_size}-piece tokenizer on {corpus_path} failed "
                         f"(with byte fallback the vocabulary needs 256 bytes + the corpus's "
                         f"characters + 5 specials): {e}") from e
    os.remove(os.path.join(out_dir, "tokenizer.vocab"))
    _drop_paths(os.path.join(out_dir, "tokenizer.model"))
    specials = {f"{k}_token": v for k, v in SPECIAL_TOKENS.items()}
    _dump({**specials, "image_token": IMAGE_TOKEN, "legacy": False, "add_bos_token": True,
           "add_eos_token": False, "tokenizer_class": "LlamaTokenizer",
           "additional_special_tokens": [IMAGE_TOKEN]},
          os.path.join(out_dir, "tokenizer_config.json"))
    _dump({**specials, "additional_special_tokens": [IMAGE_TOKEN]},
          os.path.join(out_dir, "special_tokens_map.json"))
    return out_dir


def _drop_paths(model_file):
    """Keeps only file names in the model's training spec, so the same corpus gives the same
    bytes wherever it is trained."""
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    spec = proto.trainer_spec
    spec.input[:] = [os.path.basename(p) for p in spec.input]
    spec.model_prefix = os.path.basename(spec.model_prefix)
    with open(model_file, "wb") as f:
        f.write(proto.SerializeToString())
