"""The package's import graph: imports flow one way (models <- diffusion <- data <- train / pipeline
<- cli), with no cycle, and the core never imports the examples or the benchmarks."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ldm_jax")
CORE = ("ldm_jax.models", "ldm_jax.diffusion", "ldm_jax.data")
ABOVE_CORE = ("ldm_jax.train", "ldm_jax.convert", "ldm_jax.pipeline", "ldm_jax.cli", "ldm_jax.eval",
              "ldm_jax.examples", "ldm_jax.benchmarks")
OUTSIDE_LIBRARY = ("ldm_jax.examples", "ldm_jax.benchmarks")


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Module -> the ldm_jax modules it imports (anywhere in the file, lazy imports included)."""
    modules = _modules()
    edges = {}
    for name, path in modules.items():
        targets = set()
        is_package = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join(parts + ([node.module] if node.module else []))
                found = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in found:
                while target and target not in modules:  # an attribute of a module: the module
                    target = target.rpartition(".")[0]
                if target.startswith("ldm_jax") and target != name:
                    targets.add(target)
        edges[name] = targets
    return edges


def test_the_graph_is_read(graph):
    assert len(graph) > 50
    assert "ldm_jax.models.unet" in graph["ldm_jax.pipeline"]  # a known edge, as a check on the reader
    assert "ldm_jax.train.loop" in graph["ldm_jax.train.diffusion_task"]


def test_no_import_cycle(graph):
    """No cycle between files (package ``__init__`` re-exports aside)."""
    files = {m for m in graph if not _modules()[m].endswith("__init__.py")}
    edges = {m: graph[m] & files for m in files}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(files):
        if m not in state:
            visit(m)


def test_core_imports_only_downwards(graph):
    """models, diffusion and data never import training, conversion, the pipeline, the CLI, the
    evaluation, the examples or the benchmarks; models never import diffusion or data, diffusion never
    imports data."""
    bad = sorted(f"{a} -> {b}" for a, targets in graph.items() if _under(a, CORE)
                 for b in targets if _under(b, ABOVE_CORE))
    assert not bad, bad
    order = {"ldm_jax.models": 0, "ldm_jax.diffusion": 1, "ldm_jax.data": 2}
    layer = lambda m: next((v for p, v in order.items() if _under(m, (p,))), None)  # noqa: E731
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() if layer(a) is not None
                    for b in targets if layer(b) is not None and layer(b) > layer(a))
    assert not upward, upward


def test_library_never_imports_examples_or_benchmarks(graph):
    """Only the CLI (and they themselves) import the demo and the benchmarks."""
    bad = sorted(f"{a} -> {b}" for a, targets in graph.items()
                 if not _under(a, OUTSIDE_LIBRARY) and a != "ldm_jax.cli"
                 for b in targets if _under(b, OUTSIDE_LIBRARY))
    assert not bad, bad


def test_one_training_loop(graph):
    """Every task module plugs into the one loop; no task imports another task."""
    tasks = [m for m in graph if m.startswith("ldm_jax.train.") and m.endswith("_task")]
    assert sorted(tasks) == ["ldm_jax.train.autoencoder_task", "ldm_jax.train.diffusion_task"]
    for task in tasks:
        assert "ldm_jax.train.loop" in graph[task], task
        assert not set(tasks) & graph[task], task
