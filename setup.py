"""ldm_jax: latent diffusion (Stable Diffusion) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="ldm_jax",
    version="0.1.0",
    description="Latent diffusion (Stable Diffusion) in JAX/Flax: models, sampling, training.",
    packages=find_packages(include=["ldm_jax", "ldm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "etils[epath]",
        "gcsfs",  # gs:// workdirs, latents, logs and models (etils.epath over fsspec)
        "ml_collections>=0.1.1",
        "numpy",
        "safetensors>=0.4",
        "huggingface_hub",
        "transformers>=4.40",  # tokenizer only; no torch needed at runtime
        "pillow",
        "tqdm",
        "tensorflow-datasets>=4.9",
        "grain>=0.2",
        "array_record",
        "tensorboardX",
        "matplotlib",
        "fastapi>=0.110",  # ldm-jax serve: the HTTP API (on uvicorn), its OpenAPI schema
        "uvicorn>=0.29",
        "prometheus-client",  # ldm-jax serve: /metrics
    ],
    package_data={"ldm_jax.serve": ["page.html"]},
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "pytest-xdist",  # make test: one worker per core (at most 4), a test file per worker
            "httpx",  # tests/test_serve.py: the in-process client (and FastAPI's TestClient)
            "selenium",  # tests/test_serve.py: the web page in Debian's chromium
            "torch==2.13.0",
            "diffusers>=0.40",
            "peft==0.21.2",  # the reference for LoRA files (tests/test_lora.py)
            "accelerate",
            "nbclient",
            "ipykernel",
            "nbformat",
            "gcp-storage-emulator==2026.7.19",  # a GCS API server on loopback; tests/gcs_emulator.py patches it
            # libtpu, the TPU compiler, for ahead-of-time compiles without a TPU (ldm_jax.plan,
            # tests/test_plan.py): the build that matches the jax the tests run
            "jax[tpu]==0.10.2",
        ],
    },
    entry_points={"console_scripts": ["ldm-jax=ldm_jax.cli:run"]},
)
