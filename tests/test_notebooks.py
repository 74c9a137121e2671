"""The colab/ notebooks run top to bottom (nbclient, a kernel on this interpreter) with tiny settings.

Each notebook's ``parameters`` cell (papermill convention) is followed by an injected cell with tiny
values: a random diffusers folder from ``ldm_jax.reference`` for sampling, a few-step demo for
training. The kernel runs on the CPU, offline, with XLA's cheap CPU optimisation level (these models
are tiny: compiling dominates). JAX's persistent compilation cache (``$LDM_JAX_CACHE`` or
~/.cache/ldm_jax/xla, as the pipeline tests) makes a second run several times faster.
"""
import ast
import importlib.util
import json
import os
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = "ldm_jax_test"
NOTEBOOKS = ("sampling.ipynb", "train_tpu.ipynb")


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
    km = _kernel_manager(tmp_path)
    client = nbclient.NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    finally:  # nbclient leaves a kernel it was given running (GBs for the rest of the suite)
        if km.has_kernel:
            km.shutdown_kernel(now=True)
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
    for name in NOTEBOOKS:
        nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
        nbformat.validate(nb)
        assert [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])], name
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: clear outputs"
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= 5, name


def cell_with(name, text):
    """The source of the one code cell of ``colab/<name>`` that contains ``text``."""
    nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    found = [c.source for c in nb.cells if c.cell_type == "code" and text in c.source]
    assert len(found) == 1, f"{name}: {len(found)} code cells contain {text!r}"
    return found[0]


def test_notebooks_have_no_placeholder_urls():
    for name in NOTEBOOKS:
        with open(os.path.join(ROOT, "colab", name)) as f:
            text = f.read()
        assert "YOUR_ORG" not in text and "REPO_URL" not in text and "git clone" not in text, name
        for url in re.findall(r"https?://[^\s\"'`)\]>]+", text):
            assert not re.search(r"YOUR|<|example\.(com|org)", url, re.IGNORECASE), f"{name}: placeholder URL {url}"


@pytest.fixture(params=NOTEBOOKS)
def install_cell(request, capsys):
    """The notebook's install cell run as Colab runs it (ldm_jax is importable here, so it installs nothing), then
    with its pip runner, importability, machine and jax version replaced by fakes; ``pip_calls`` records pip."""
    assert importlib.util.find_spec("ldm_jax") is not None  # else the cell would run pip for real
    source = cell_with(request.param, "def install_ldm_jax(")
    ns = {"__name__": "__main__"}
    exec(compile(source, f"{request.param}:install", "exec"), ns)
    assert "ldm_jax 0.1.0 from" in capsys.readouterr().out
    ns["pip_calls"] = []
    ns.update(run_pip=ns["pip_calls"].append, ldm_jax_importable=lambda: False, accelerator=lambda: "cpu",
              installed_jax_version=lambda: "0.6.0", jax_imported=lambda: True)
    return ns


def package_dirs(tmp_path, **files):
    """Folders standing in for /content and Google Drive, holding ``files`` {folder: [names, oldest first]}."""
    dirs = []
    for folder in ("content", "drive"):
        (tmp_path / folder).mkdir()
        for age, name in enumerate(reversed(files.get(folder, []))):
            (tmp_path / folder / name).write_text("")
            os.utime(tmp_path / folder / name, (1e9 - age, 1e9 - age))
        dirs.append(str(tmp_path / folder))
    return dirs


def test_install_cell_is_the_same_in_every_notebook():
    assert len({cell_with(name, "def install_ldm_jax(") for name in NOTEBOOKS}) == 1


def test_install_cell_jax_requirement_is_setup_pys(install_cell):
    with open(os.path.join(ROOT, "setup.py")) as f:
        (required,) = re.findall(r"""["']jax([<>=!~][^"']*)["']""", f.read())
    assert install_cell["JAX_REQUIREMENT"] == required


def test_install_cell_does_nothing_when_ldm_jax_is_importable(install_cell, tmp_path):
    install_cell["ldm_jax_importable"] = lambda: True
    dirs = package_dirs(tmp_path, content=["ldm_jax-0.1.0-py3-none-any.whl"])
    assert install_cell["find_ldm_jax_source"]("/some/ldm_jax", dirs) is None
    assert install_cell["install_ldm_jax"]("/some/ldm_jax", search_dirs=dirs) is None
    assert install_cell["pip_calls"] == []


def test_install_cell_uses_ldm_jax_source_first(install_cell, tmp_path):
    dirs = package_dirs(tmp_path, content=["ldm_jax-0.1.0-py3-none-any.whl"])
    fork = "git+https://git.internal/team/ldm_jax.git@main"
    assert install_cell["find_ldm_jax_source"](f"  {fork} ", dirs) == fork
    assert install_cell["install_ldm_jax"](fork, search_dirs=dirs) == ["install", "-q", fork]  # CPU: jax kept
    install_cell["accelerator"] = lambda: "tpu"  # the runtime's jax 0.6.0 is kept, next to its libtpu
    assert install_cell["install_ldm_jax"](fork, search_dirs=dirs) == [
        "install", "-q", fork, "jax[tpu]==0.6.0", "-f", install_cell["LIBTPU_RELEASES"]]
    assert install_cell["pip_calls"][0] == ["install", "-q", fork] and len(install_cell["pip_calls"]) == 2


def test_install_cell_finds_an_uploaded_wheel(install_cell, tmp_path):
    find = install_cell["find_ldm_jax_source"]
    dirs = package_dirs(tmp_path, content=["ldm_jax-0.1.0-py3-none-any (1).whl", "notes.txt"],
                        drive=["ldm_jax-0.1.0-py3-none-any.whl", "ldm_jax-0.2.0-py3-none-any.whl",
                               "ldm_jax-0.3.0.tar.gz"])
    assert find("", dirs) == os.path.join(dirs[1], "ldm_jax-0.2.0-py3-none-any.whl")  # a wheel, the latest upload
    (tmp_path / "content" / "ldm_jax-0.1.0.tar.gz").write_text("")  # /content comes before Drive
    assert find("", dirs) == os.path.join(dirs[0], "ldm_jax-0.1.0.tar.gz")
    args = install_cell["install_ldm_jax"]("", search_dirs=dirs)
    assert install_cell["pip_calls"] == [args] == [["install", "-q", os.path.join(dirs[0], "ldm_jax-0.1.0.tar.gz")]]


def test_install_cell_stops_with_build_instructions(install_cell, tmp_path):
    dirs = package_dirs(tmp_path, content=["ldm_jax.zip", "ldm_jax-0.1.0-py3-none-any (1).whl"])
    with pytest.raises(install_cell["NoLdmJaxSource"]) as err:
        install_cell["install_ldm_jax"]("", search_dirs=dirs)
    message = str(err.value)
    for part in ("python -m pip wheel --no-deps -w dist .", "dist/ldm_jax-*.whl", "LDM_JAX_SOURCE", "MOUNT_DRIVE",
                 *dirs):
        assert part in message, part
    assert install_cell["pip_calls"] == []


def test_install_cell_keeps_a_recent_jax_and_asks_for_a_restart_otherwise(install_cell, tmp_path):
    jax_packages = install_cell["jax_packages"]
    assert jax_packages("tpu", "0.6.0") == (["jax[tpu]==0.6.0"], False)
    assert jax_packages("gpu", "0.6.0") == (["jax[cuda12]==0.6.0"], False)
    assert jax_packages("cpu", "0.6.0") == ([], False)
    assert jax_packages("tpu", None) == (["jax[tpu]>=0.4.35"], False)  # nothing to replace
    assert jax_packages("tpu", "0.4.30") == (["jax[tpu]>=0.4.35"], True)
    install_cell.update(accelerator=lambda: "tpu", installed_jax_version=lambda: "0.4.30")
    wheel = str(tmp_path / "ldm_jax-0.1.0-py3-none-any.whl")
    with pytest.raises(install_cell["RestartNeeded"], match=r"Restart session"):  # jax 0.4.30 already imported
        install_cell["install_ldm_jax"](wheel)
    assert install_cell["pip_calls"][0][:4] == ["install", "-q", wheel, "jax[tpu]>=0.4.35"]
    install_cell["jax_imported"] = lambda: False
    install_cell["install_ldm_jax"](wheel)  # nothing imported yet: a note, no stop
    assert len(install_cell["pip_calls"]) == 2


def test_devices_cell_calls_setup_tpu_only_on_a_tpu_node_runtime():
    for name in NOTEBOOKS:
        source = cell_with(name, "jax.devices()")
        calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
                 and getattr(node.func, "attr", getattr(node.func, "id", None)) == "setup_tpu"]
        guarded = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.If)
                   and "COLAB_TPU_ADDR" in ast.unparse(node.test)
                   for inner in ast.walk(node) if isinstance(inner, ast.Call)
                   and getattr(inner.func, "attr", None) == "setup_tpu"]
        assert len(calls) == len(guarded) <= 1, name


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
    assert "1 device(s), kind 'cpu'" in text and "running on the CPU" in text
    from PIL import Image

    sizes = {name: Image.open(out / name).size for name in os.listdir(out)}
    assert sizes == {"txt2img.png": (64, 32), "img2img.png": (64, 32), "inpaint.png": (96, 32)}


# test_train_notebook: in test_demo.py, on the demo run's output folder (one demo run for both)
