"""Tiny random transformers BLIP-2 / InstructBLIP models (vision 2 layers 32 wide at 28 px,
patch 7; Q-Former 2 layers 32 wide, 4 queries; LLM 2 layers 32 wide) with every tensor
randomized, so that a dropped, transposed or swapped tensor changes the logits."""
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

NUM_QUERIES = 4
IMAGE_TOKEN = 127  # the last id of the LLM's vocabulary of 128
VOCAB = 128

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=28, patch_size=7, layer_norm_eps=1e-5, hidden_act="gelu")
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               vocab_size=99, max_position_embeddings=40, layer_norm_eps=1e-6,
               cross_attention_frequency=2)
TEXT = {
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
    "opt": dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=128, bos_token_id=2, eos_token_id=2, pad_token_id=1),
    "t5": dict(model_type="t5", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
               num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=8, relative_attention_max_distance=20,
               tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
               eos_token_id=1),
}
CLASSES = {"blip2": (transformers.Blip2Config, transformers.Blip2ForConditionalGeneration),
           "instructblip": (transformers.InstructBlipConfig,
                            transformers.InstructBlipForConditionalGeneration)}


def build(family: str, text: str, seed: int = 0, vision: dict = None, text_config: dict = None):
    """A float32 HF model in eval mode, every parameter drawn at random (`vision` and
    `text_config` replace VISION and TEXT[text])."""
    config_cls, model_cls = CLASSES[family]
    config = config_cls(vision_config=dict(vision or VISION), qformer_config=dict(QFORMER),
                        text_config=dict(text_config or TEXT[text]),
                        num_query_tokens=NUM_QUERIES,
                        image_token_index=IMAGE_TOKEN)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if text == "t5":
        # Flan-T5 has its own output head; transformers 5 ties it to `shared` unless the
        # checkpoint stores its own, so give it one.
        lm = model.language_model
        lm.lm_head.weight = torch.nn.Parameter(torch.empty_like(lm.shared.weight))
        model.all_tied_weights_keys.pop("language_model.lm_head.weight", None)
        lm.all_tied_weights_keys.pop("lm_head.weight", None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name.lower() or name.endswith("layernorm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # scales around 1, never all ones
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def inputs(family: str, text: str, seed: int = 0, pad_side: str = "left"):
    """A padded batch of 2 as HF's processor builds it: the image tokens, then the padded
    text (the second prompt shorter); InstructBLIP's instruction for the Q-Former
    right-padded as its BERT tokenizer pads. Pixels NCHW (HF) and NHWC (ours)."""
    rng = np.random.RandomState(seed)
    text_cfg = TEXT[text]
    pad = text_cfg["pad_token_id"]
    bos = text_cfg.get("bos_token_id")
    lengths = (6, 3)
    width = max(lengths) + (bos is not None)
    ids = np.full((2, width), pad, np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, n in enumerate(lengths):
        row = list(rng.randint(3, IMAGE_TOKEN, n))
        if bos is not None:
            row = [bos] + row
        if pad_side == "left":
            ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
        else:
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
    image = np.full((2, NUM_QUERIES), IMAGE_TOKEN, np.int64)
    out = dict(input_ids=np.concatenate([image, ids], 1),
               attention_mask=np.concatenate([np.ones_like(image), mask], 1))
    pixels = rng.standard_normal((2, 3, VISION["image_size"], VISION["image_size"]))
    pixels[1] = 2.0 * pixels[1] + 0.5
    out["pixel_values"] = pixels.astype(np.float32)
    if family == "instructblip":
        q_ids = rng.randint(1, QFORMER["vocab_size"], (2, 5))
        q_mask = np.ones((2, 5), np.int64)
        q_ids[1, 3:], q_mask[1, 3:] = 0, 0
        out.update(qformer_input_ids=q_ids, qformer_attention_mask=q_mask)
    return out


def torch_inputs(batch: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def jax_inputs(batch: dict) -> dict:
    out = dict(batch)
    out["pixel_values"] = batch["pixel_values"].transpose(0, 2, 3, 1)
    return out


WORDS = ["what", "is", "in", "the", "picture", "question", "short", "answer", ":", "?",
         "a", "red", "square", "left", "color"] + [f"w{i}" for i in range(200)]


def word_tokenizer(specials, n_words, template, **names):
    """A word-level fast tokenizer: `specials`, then the first `n_words` of WORDS."""
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in WORDS[:n_words]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials
                                         if s in template.split()])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def save_processor(d):
    """An InstructBlipProcessor for the tiny models saved into `d` as HF lays it out: the
    LLM's tokenizer (its vocabulary fills ids 0..126, so the added "<image>" is 127),
    `qformer_tokenizer/` (BERT-style [CLS] text [SEP]), the image processor."""
    llm_tok = word_tokenizer(["<pad>", "<s>", "</s>", "<unk>"], IMAGE_TOKEN - 4, "<s> $A",
                             bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                             unk_token="<unk>")
    qformer_tok = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], 60, "[CLS] $A [SEP]",
                                 pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                 sep_token="[SEP]")
    size = VISION["image_size"]
    images = transformers.BlipImageProcessor(size={"height": size, "width": size})
    processor = transformers.InstructBlipProcessor(images, llm_tok, qformer_tok,
                                                   num_query_tokens=NUM_QUERIES)
    processor.save_pretrained(d)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    return processor


def instructblip_checkpoint(directory, seed: int):
    """A tiny InstructBLIP (LLaMA) checkpoint directory as HF writes one: the model
    (`build(..., seed)`), then its processor (`save_processor`). Returns (model, processor)."""
    hf = build("instructblip", "llama", seed=seed)
    hf.save_pretrained(directory)
    return hf, save_processor(directory)


def random_image(path, seed: int):
    """Saves a random RGB image of the vision config's size at `path`; returns the path."""
    from PIL import Image
    size = VISION["image_size"]
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)
