"""The colab/ notebooks run top to bottom (nbclient, a kernel on this interpreter) with tiny settings.

Each notebook's ``parameters`` cell (papermill convention) is followed by an injected cell with tiny
values: a random diffusers folder from ``ldm_jax.reference`` for sampling, a few-step demo for
training. The kernel runs on the CPU, offline, with XLA's cheap CPU optimisation level (these models
are tiny: compiling dominates). JAX's persistent compilation cache (``$LDM_JAX_CACHE`` or
~/.cache/ldm_jax/xla, as the pipeline tests) makes a second run several times faster.
"""
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = "ldm_jax_test"


def _kernel_manager(tmp_path):
    """A kernel on ``sys.executable`` from a kernelspec in ``tmp_path`` (no system-wide Jupyter set-up)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    env = {"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
           "MPLBACKEND": "Agg", "TQDM_DISABLE": "1", "PYTHONPATH": ROOT}
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ldm_jax tests", "language": "python", "env": env}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


def run_notebook(name, params, tmp_path, timeout=600):
    """Execute ``colab/<name>`` with ``params`` injected after its parameters cell; returns the notebook."""
    nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters'"
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, injected)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=timeout,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == kind]


def images_shown(nb):
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def text_of(nb):
    return "".join(o.get("text", "") for o in outputs(nb, "stream"))


def check_clean(nb):
    assert not outputs(nb, "error"), outputs(nb, "error")
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "a cell did not run"


def test_notebooks_are_valid_and_parameterised():
    for name in ("sampling.ipynb", "train_tpu.ipynb"):
        nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
        nbformat.validate(nb)
        assert [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])], name
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: clear outputs"
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= 5, name


def test_sampling_notebook(tmp_path):
    from ldm_jax.reference import write_reference_folder

    model = write_reference_folder(str(tmp_path / "model"), "v1")
    out = tmp_path / "samples"
    nb = run_notebook("sampling.ipynb", dict(MODEL=model, STEPS=2, HEIGHT=32, WIDTH=32, NUM_IMAGES=2,
                                             SAMPLER="ddim", OUT_DIR=str(out)), tmp_path)
    check_clean(nb)
    assert images_shown(nb) == 3  # txt2img grid, img2img pair, inpainting row
    text = text_of(nb)
    assert "backend 'cpu'" in text and "compute dtype: float32" in text and "mask" in text
    from PIL import Image

    sizes = {name: Image.open(out / name).size for name in os.listdir(out)}
    assert sizes == {"txt2img.png": (64, 32), "img2img.png": (64, 32), "inpaint.png": (96, 32)}


def test_train_notebook(tmp_path):
    overrides = ["--config.autoencoder.steps=5", "--config.diffusion.steps=5", "--config.diffusion.warmup_steps=1",
                 "--config.data.num_train=64", "--config.data.num_validation=16", "--config.data.num_heldout=16",
                 "--config.sample.steps=2", "--config.sample.num_prompts=2", "--config.eval.num_prompts=2",
                 "--config.eval.batch_size=2", "--config.eval.classifier_images=32",
                 "--config.eval.classifier_steps=3", "--config.text_pretrain.steps=3"]
    out = tmp_path / "demo"
    nb = run_notebook("train_tpu.ipynb", dict(OVERRIDES=overrides, OUT_DIR=str(out),
                                              MY_PROMPTS=["a red circle", "a blue star"]), tmp_path)
    check_clean(nb)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["samples"]) == {"train", "heldout"}
    # data grid, loss plot, 2 splits x (real + one grid per guidance scale of the recipe), own prompts
    from ldm_jax.examples.shapes_demo.config import get_config

    num_guidance = len(get_config().sample.guidance_scales)
    assert images_shown(nb) == 1 + 1 + 2 * (1 + num_guidance) + 1
    text = text_of(nb)
    assert "seconds per stage" in text and "demo bar passed" in text and "diffusion loss: first logged" in text
