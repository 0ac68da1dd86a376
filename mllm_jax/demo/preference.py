"""On-policy preference pairs for stage 3: the stage-2 model describes training images in
detail; where its description names an object the scene does not hold, the pair (the
faithful detailed caption chosen, the model's own description rejected) joins the world's
preference pairs (`preference_train.json`: an absent companion added)."""
from __future__ import annotations

import json
import os

from mllm_jax.demo import shapes
from mllm_jax.infer.batching import Conversation, generate_all
from mllm_jax.demo.evaluate import TEMPLATE, image_config


def hallucinated(text: str, present) -> list:
    """Objects `text` mentions that are not in `present`, in order."""
    present = set(present)
    return [o for o in shapes.mentioned_objects(text) if o not in present]


def on_policy_pairs(model, params, tokenizer, data_dir, records, *, batch_size=128,
                    max_new_tokens=96, progress=None) -> list:
    """Preference records {id, image, prompt, chosen, rejected, rejected_object} for the
    given world preference records whose greedy detailed description hallucinates."""
    convs = [Conversation([{"from": "human", "value": r["prompt"]}],
                          [os.path.join(data_dir, r["image"])], r["id"]) for r in records]
    answers = generate_all(model, params, tokenizer, image_config(model.cfg), convs, TEMPLATE,
                           batch_size=batch_size, pad_to_multiple=16, progress=progress,
                           max_new_tokens=max_new_tokens)
    out = []
    for r, answer in zip(records, answers):
        wrong = hallucinated(answer, shapes.mentioned_objects(r["chosen"]))
        if wrong and answer.strip():
            out.append({"id": f"{r['id']}-own", "image": r["image"], "prompt": r["prompt"],
                        "chosen": r["chosen"], "rejected": answer,
                        "rejected_object": wrong[0]})
    return out


def read_records(path) -> list:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_records(path, records):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return path
