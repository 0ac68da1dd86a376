from setuptools import find_packages, setup

TORCH = ["torch==2.13.0", "transformers>=4.46"]
TFDS = ["tensorflow-datasets", "importlib_resources"]

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
        # The builders write and read array_record files without TensorFlow; tensorflow-cpu
        # is for TFDS builders that encode images with it. tensorflow-datasets 4.9.10 imports
        # importlib_resources without declaring it.
        "tfds": TFDS + ["tensorflow-cpu"],
        # The demo describes scikit-learn's bundled sample photographs.
        "demo": ["scikit-learn"],
        "test": TORCH + TFDS + ["scikit-learn", "pytest", "pytest-xdist"],
    },
    entry_points={"console_scripts": ["mllm-jax=mllm_jax.cli:main"]},
)
