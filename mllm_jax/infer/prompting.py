"""From a checkpoint directory, images and a question to generated text: the tokenizer,
image processor and template of the checkpoint, then `generate`."""
from mllm_jax.data.templates import get_template
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.infer import batching
from mllm_jax.infer.batching import image_config_for
from mllm_jax.infer.chat_template import resolve_template
from mllm_jax.models import registry


class Session:
    """A conversation with a loaded model: `ask(text, images=())` returns the answer and
    keeps the turns (and images) for the next question.

    `template` None: the one the checkpoint records (`infer.chat_template`), else
    vicuna_v1; `system` None: the recorded system prompt when the template is the recorded
    one, else the template's own; `image_placement` None: likewise the recorded one, else
    "as_written" (`data.templates.IMAGE_PLACEMENTS`)."""

    def __init__(self, model, params, checkpoint_dir, template=None, *,
                 max_new_tokens=128, system=None, image_placement=None, **sampling):
        self.model, self.params = model, params
        self.tokenizer = load_tokenizer(checkpoint_dir)
        recorded = resolve_template(checkpoint_dir, template)
        self.template = recorded.name
        self.system = recorded.system if system is None else system
        self.image_placement = recorded.image_placement if image_placement is None \
            else image_placement
        self._template = get_template(self.template, self.image_placement)  # validates it
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.multimodal = registry.is_multimodal(model.cfg)
        self.image_cfg = image_config_for(model, checkpoint_dir) if self.multimodal else None
        self.prompt_encoder = batching.prompt_encoder_for(model, checkpoint_dir)
        self.turns, self.images = [], []

    def ask(self, text, images=()):
        if images and not self.multimodal:
            raise ValueError("this checkpoint has no vision tower; it takes no images")
        value = "<image>\n" * len(images) + text
        conversation = self.turns + [{"from": "human", "value": value}]
        every_image = self.images + list(images)
        answer = batching.generate_batch(
            self.model, self.params, self.tokenizer, self.image_cfg,
            [batching.Conversation(conversation, every_image)], self._template,
            system=self.system, pad_to_multiple=1, max_new_tokens=self.max_new_tokens,
            prompt_encoder=self.prompt_encoder, **self.sampling)[0]
        self.images = every_image
        self.turns = conversation + [{"from": "gpt", "value": answer}]
        return answer
