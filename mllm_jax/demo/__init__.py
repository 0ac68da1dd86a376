"""`mllm-jax demo`: pre-training, the three LLaVA stages and their evaluation on the shapes
world, on a CPU (`run`); settings per scale in `configs`."""
import os

from mllm_jax.demo.configs import SCALES, Settings, settings_for
from mllm_jax.demo.pipeline import run

# A bundled sample picture (for examples that need an image file).
IMAGE_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "demo.png")

__all__ = ["IMAGE_PATH", "SCALES", "Settings", "run", "settings_for"]
