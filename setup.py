from setuptools import find_packages, setup

TORCH = ["torch==2.13.0", "transformers>=4.46"]

setup(
    name="mllm_jax",
    version="0.1.0",
    description="Multimodal LLMs (LLaVA-style) in JAX/Flax: HF checkpoints in and out, "
    "sharded training, evaluation.",
    packages=find_packages(include=["mllm_jax", "mllm_jax.*"]),
    package_data={"mllm_jax": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8.5",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "sentencepiece",
        "numpy",
        "pillow",
        "safetensors",
        "tensorboardX",
    ],
    extras_require={
        "torch": TORCH,
        "tfds": ["tensorflow-datasets", "tensorflow-cpu", "importlib_resources"],
        "test": TORCH + ["pytest", "pytest-xdist"],
    },
    entry_points={"console_scripts": ["mllm-jax=mllm_jax.cli:main"]},
)
