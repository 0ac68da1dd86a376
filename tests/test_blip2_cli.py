"""`mllm-jax generate` and `eval` on a tiny InstructBLIP (LLaMA) checkpoint directory laid
out as HF writes it (the model, then `InstructBlipProcessor.save_pretrained`: the LLM's
tokenizer, `qformer_tokenizer/`, the image processor): the answers equal HF's processor +
`generate`, including BLIP-2's zero-shot VQA setting (prompt "Question: {} Short answer:",
5 beams, length penalty -1)."""
import json
import os

import pytest
import torch
from PIL import Image

import hf_blip2_factories as F
from mllm_jax.cli import main
from mllm_jax.models import blip2  # noqa: F401  (registers the families)
from mllm_jax.models.registry import ENCODERS

pytestmark = pytest.mark.skipif("eva" not in ENCODERS,
                                reason="needs the eva encoder (BLIP-2's ViT)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, HF model, HF processor, image path)."""
    root = tmp_path_factory.mktemp("instructblip_cli")
    d = str(root / "ckpt")
    hf, processor = F.instructblip_checkpoint(d, seed=3)
    return d, hf, processor, F.random_image(root / "picture.png", seed=0)


def _hf_answer(checkpoint, prompt, **gen):
    _, hf, processor, image = checkpoint
    inputs = processor(images=Image.open(image).convert("RGB"), text=prompt,
                       return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, **gen)
    new = out[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_generate_answers_as_transformers(checkpoint, capsys):
    d, _, _, image = checkpoint
    prompt = "what is in the picture ?"
    assert main(["generate", "--ckpt", d, "--image", image, "--prompt", prompt,
                 "--max-new-tokens", "6"]) == 0
    got = capsys.readouterr().out.strip()
    want = _hf_answer(checkpoint, prompt, max_new_tokens=6)
    assert want and got == want


def test_eval_with_blip2_vqa_prompt_and_beams(checkpoint, tmp_path, capsys):
    d, _, _, image = checkpoint
    data = tmp_path / "gqa"
    data.mkdir()
    Image.open(image).save(data / "n0.png")
    os.rename(data / "n0.png", data / "n0.jpg")  # GQA names images {imageId}.jpg
    questions = {"q0": {"imageId": "n0", "question": "what color is the square ?",
                        "answer": "red"}}
    path = data / "testdev_balanced_questions.json"
    path.write_text(json.dumps(questions))
    out = tmp_path / "out"
    assert main(["eval", "--ckpt", d, "--task", "gqa", "--data", str(path), "--output",
                 str(out), "--prompt-format", "question : {} short answer :",
                 "--prompt-suffix", "", "--num-beams", "5", "--length-penalty", "-1",
                 "--max-new-tokens", "5", "--batch-size", "1"]) == 0
    capsys.readouterr()
    (model_dir,) = os.listdir(out)
    (samples,) = [f for f in os.listdir(out / model_dir) if "samples_gqa" in f]
    with open(out / model_dir / samples) as f:
        record = json.loads(f.readline())
    want = _hf_answer(checkpoint, "question : what color is the square ? short answer :",
                      max_new_tokens=5, num_beams=5, length_penalty=-1.0)
    assert want and record["resps"] == [want]
    assert record["input"] == "<image>question : what color is the square ? short answer :"
