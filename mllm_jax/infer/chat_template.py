"""The conversation template a checkpoint was trained with, recorded in the checkpoint.

`write_chat_template(dir, name)` writes two fields into the checkpoint's
tokenizer_config.json (creating the file if there is none):

  "chat_template"      the template as a Jinja string, what transformers'
                       `tokenizer.apply_chat_template` renders (BOS written as `bos_token`);
                       left out for templates that are no chat format (`plain`);
  "mllm_jax_template"  {"name": our template's name (`mllm_jax.data.templates`), "system":
                       the system prompt it was trained with (null: the template's own),
                       "prompt_suffixes": {kind: text}}: what the model saw after a
                       question where the benchmarks append an answer-format instruction
                       (kinds in PROMPT_SUFFIX_KINDS; e.g. {"short_answer": ""}: the bare
                       question, never "Answer the question using a single word or phrase."),
                       and "image_placement" when it is not "as_written" (where a user
                       message's images go, `data.templates.IMAGE_PLACEMENTS`; the Jinja
                       template then places them so too).

`read_chat_template(dir)` returns that record (or None), `copy_chat_template(src, dst)`
carries it from one checkpoint directory to another, and `resolve_template` what
`generate`, `chat` and `eval` use: an explicitly given template name wins, then the recorded
one, then DEFAULT_TEMPLATE.
"""
from __future__ import annotations

import dataclasses
import json

from mllm_jax import storage
from mllm_jax.data.templates import AS_WRITTEN, IMAGE_PLACEHOLDER, LLAVA, \
    check_image_placement, get_template

CONFIG_FILE = "tokenizer_config.json"
FIELD = "mllm_jax_template"
DEFAULT_TEMPLATE = "vicuna_v1"
# Kinds of answer-format instructions a benchmark appends to its questions (the eval tasks'
# `prompt_suffix` values they stand for are in `mllm_jax.eval.runner`).
PROMPT_SUFFIX_KINDS = ("short_answer", "letter_answer")


@dataclasses.dataclass(frozen=True)
class RecordedTemplate:
    """A checkpoint's conversation template: `name` (one of `data.templates.TEMPLATES`),
    `system` (None: the template's default system prompt) and `prompt_suffixes`
    ({kind: text} for kinds in PROMPT_SUFFIX_KINDS; a kind not given: the benchmark's
    own instruction) and `image_placement` (where a user message's images go)."""
    name: str
    system: str | None = None
    prompt_suffixes: dict = dataclasses.field(default_factory=dict)
    image_placement: str = AS_WRITTEN

    def template(self):
        """The `data.templates.Template` to prompt with (with the image placement)."""
        return get_template(self.name, self.image_placement)


def _set_system(default) -> str:
    literal = "none" if default is None else json.dumps(default)
    return ("{% if messages and messages[0]['role'] == 'system' %}"
            "{% set system = messages[0]['content'] | trim %}"
            "{% set loop_messages = messages[1:] %}"
            "{% else %}"
            f"{{% set system = {literal} %}}"
            "{% set loop_messages = messages %}"
            "{% endif %}")


# The body of each template's Jinja, after the system prompt is set: what `data.templates`
# renders for the same conversation, BOS written as `bos_token`. No whitespace control
# ("{%-"): the spaces and newlines between tags are the template's own.
_USER, _ANSWER = "{% if m['role'] == 'user' %}", "{% else %}"
_NEXT = "{% if not loop.last or add_generation_prompt %}"
_TEXT = "{{ m['content'] | trim }}"
_JINJA = {
    "vicuna_v1": (
        "{{ bos_token }}{{ (system or '') + ' ' }}{% for m in loop_messages %}"
        f"{_USER}USER: {_TEXT}{_NEXT} ASSISTANT:{{% endif %}}"
        f"{_ANSWER} {_TEXT}{{{{ eos_token }}}}{{% endif %}}{{% endfor %}}"),
    "llama_2": (
        "{{ bos_token }}{% for m in loop_messages %}"
        f"{_USER}{{% if not loop.first %}}{{{{ bos_token }}}}{{% endif %}}[INST] "
        "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
        f"{_TEXT} [/INST]{_ANSWER} {_TEXT} {{{{ eos_token }}}}{{% endif %}}{{% endfor %}}"),
    "mistral": (
        "{{ bos_token }}{% for m in loop_messages %}"
        f"{_USER}[INST] {{% if loop.first and system %}}{{{{ system }}}}\n\n{{% endif %}}"
        f"{_TEXT} [/INST]{_ANSWER}{{% if m['content'] | trim %}} {_TEXT}{{% endif %}}"
        "{{ eos_token }}{% endif %}{% endfor %}"),
    "llama_3": (
        "{{ bos_token }}{% if system %}<|start_header_id|>system<|end_header_id|>\n\n"
        "{{ system }}<|eot_id|>{% endif %}{% for m in loop_messages %}"
        f"{_USER}<|start_header_id|>user<|end_header_id|>\n\n{_TEXT}<|eot_id|>"
        f"{_NEXT}<|start_header_id|>assistant<|end_header_id|>\n\n{{% endif %}}"
        f"{_ANSWER}{_TEXT}<|eot_id|>{{% endif %}}{{% endfor %}}"),
    "chatml": (
        "{% if system %}<|im_start|>system\n{{ system }}<|im_end|>\n{% endif %}"
        "{% for m in loop_messages %}"
        f"{_USER}<|im_start|>user\n{_TEXT}<|im_end|>\n"
        f"{_NEXT}<|im_start|>assistant\n{{% endif %}}"
        f"{_ANSWER}{_TEXT}<|im_end|>\n{{% endif %}}{{% endfor %}}"),
}


# image_placement "llava": each message's text as `text`, a user message's images moved to
# its front as `data.templates.place_images` moves them.
_PLACED = (
    "{% set text = m['content'] | trim %}"
    f"{{% if m['role'] == 'user' and '{IMAGE_PLACEHOLDER}' in text %}}"
    f"{{% set text = (('{IMAGE_PLACEHOLDER}' * text.count('{IMAGE_PLACEHOLDER}')) ~ '\\n' ~ "
    f"(text.replace('{IMAGE_PLACEHOLDER}', '') | trim)) | trim %}}{{% endif %}}")
_LOOP = "{% for m in loop_messages %}"


def jinja_template(name: str, image_placement: str = AS_WRITTEN) -> str | None:
    """The Jinja chat template (transformers' `chat_template`) of one of our templates, or
    None when it has none (`plain`: images then a caption, no chat)."""
    # an unknown name is a KeyError listing the known ones
    tpl = get_template(name, image_placement)
    body = _JINJA.get(tpl.name)
    if body is None:
        return None
    if tpl.image_placement == LLAVA:
        body = body.replace(_LOOP, _LOOP + _PLACED).replace(_TEXT, "{{ text }}")
    return _set_system(tpl.default_system) + body


def _config_path(checkpoint_dir) -> str:
    return storage.join(checkpoint_dir, CONFIG_FILE)


def _read_config(path) -> dict:
    if not storage.exists(path):
        return {}
    try:
        with storage.open_file(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def write_chat_template(checkpoint_dir, template: str, *, system: str | None = None,
                        prompt_suffixes: dict | None = None,
                        image_placement: str = AS_WRITTEN) -> str:
    """Records the conversation template `template` (with the `system` prompt, the
    `prompt_suffixes` and the `image_placement` the model was trained with; see the module
    doc) in the checkpoint directory's tokenizer_config.json, keeping its other fields.
    Returns the file's path."""
    name = get_template(template).name
    check_image_placement(image_placement)
    suffixes = dict(prompt_suffixes or {})
    unknown = sorted(set(suffixes) - set(PROMPT_SUFFIX_KINDS))
    if unknown:
        raise ValueError(f"prompt_suffixes: unknown kind(s) {unknown}; known: "
                         f"{list(PROMPT_SUFFIX_KINDS)}")
    if not all(isinstance(v, str) for v in suffixes.values()):
        raise ValueError(f"prompt_suffixes: values must be strings, got {suffixes!r}")
    path = _config_path(checkpoint_dir)
    cfg = _read_config(path)
    jinja = jinja_template(name, image_placement)
    if jinja is None:
        cfg.pop("chat_template", None)
    else:
        cfg["chat_template"] = jinja
    cfg[FIELD] = {"name": name, "system": system, "prompt_suffixes": suffixes}
    if image_placement != AS_WRITTEN:
        cfg[FIELD]["image_placement"] = image_placement
    storage.makedirs(storage.dirname(path))
    with storage.open_file(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def read_chat_template(checkpoint_dir) -> RecordedTemplate | None:
    """The template recorded by `write_chat_template`, or None when the checkpoint records
    none. A malformed record is a ValueError naming the file."""
    path = _config_path(checkpoint_dir)
    record = _read_config(path).get(FIELD)
    if record is None:
        return None
    where = f"{path}: {FIELD}"
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise ValueError(f"{where} must be {{\"name\": template, \"system\": ..., "
                         f"\"prompt_suffixes\": {{...}}}}, got {record!r}; rewrite it with "
                         f"mllm_jax.infer.chat_template.write_chat_template")
    try:
        name = get_template(record["name"]).name
    except KeyError as e:
        raise ValueError(f"{where}: {e.args[0]}") from None
    system = record.get("system")
    suffixes = record.get("prompt_suffixes") or {}
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where}: system must be a string or null, got {system!r}")
    if not isinstance(suffixes, dict) or not all(
            k in PROMPT_SUFFIX_KINDS and isinstance(v, str) for k, v in suffixes.items()):
        raise ValueError(f"{where}: prompt_suffixes must map some of "
                         f"{list(PROMPT_SUFFIX_KINDS)} to strings, got {suffixes!r}")
    try:
        placement = check_image_placement(record.get("image_placement", AS_WRITTEN),
                                          "image_placement")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return RecordedTemplate(name, system, dict(suffixes), placement)


def resolve_template(checkpoint_dir, template: str | None = None) -> RecordedTemplate:
    """What to prompt the checkpoint with: `template` when given, else the checkpoint's
    recorded template, else DEFAULT_TEMPLATE. The recorded system prompt, suffixes and image
    placement come with the recorded template only (another template gets its own default
    system prompt, the benchmarks' own suffixes and images as written)."""
    recorded = read_chat_template(checkpoint_dir)
    if template is None:
        return recorded or RecordedTemplate(DEFAULT_TEMPLATE)
    name = get_template(template).name
    return recorded if recorded is not None and recorded.name == name \
        else RecordedTemplate(name)


def copy_chat_template(src_dir, dst_dir) -> RecordedTemplate | None:
    """Carries the template recorded in `src_dir` over to `dst_dir` (a conversion's
    output); returns it, or None (nothing written) when `src_dir` records none."""
    recorded = read_chat_template(src_dir)
    if recorded is not None:
        write_chat_template(dst_dir, recorded.name, system=recorded.system,
                            prompt_suffixes=recorded.prompt_suffixes,
                            image_placement=recorded.image_placement)
    return recorded
