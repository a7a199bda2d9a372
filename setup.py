"""mpt-jax: MosaicML's MPT models in JAX/Flax: model, training, conversion, serving."""

from setuptools import find_packages, setup

HF = ["torch", "transformers>=4.40"]
SERVE = ["fastapi", "uvicorn"]  # python -m mpt_jax.serve
NOTEBOOKS = ["nbclient", "nbformat", "ipykernel", "matplotlib"]  # notebooks/, run by tests/test_notebooks.py
# pytest-xdist: pyproject.toml runs the suite on two workers
TESTING = ["pytest", "pytest-xdist", "ruff", "openai", "prometheus_client", "lm-eval[hf]==0.4.13"]

setup(
    name="mpt-jax",
    version="0.1.0",
    description="MPT (MosaicML Pretrained Transformer) in JAX/Flax: train, finetune, convert, serve",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mpt_jax", "mpt_jax.*"]),
    install_requires=[
        "jax>=0.10",
        "flax",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "ml-collections",
        "tokenizers",
        "jinja2>=3.1.6",  # chat templates (mpt_jax.prompts), sandboxed as transformers requires
        "safetensors",
        "huggingface_hub",
        "ml_dtypes",
        "numpy",
        "absl-py",
        "tqdm",
        "tensorboardX",
    ],
    extras_require={
        "hf": HF,
        "serve": SERVE,
        "eval": ["lm-eval==0.4.13"],  # the mpt_jax backend of lm-evaluation-harness
        "notebooks": NOTEBOOKS,
        "test": HF + SERVE + NOTEBOOKS + TESTING,
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
)
