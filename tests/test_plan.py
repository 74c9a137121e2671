"""`ldm-jax plan`: the real TPU compiler (libtpu, no TPU) on the tiny configs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import plan
from ldm_jax.config_utils import load_config

# XLA's cheapest optimisation level: the same memory and cost figures on these tiny programs, compiled
# in about half the time (the plan compiles what `train` would, with the config's compiler options)
FAST = "--config.train.compiler_options={'xla_backend_optimization_level': 0}"


@pytest.fixture(scope="module")
def data_plan():
    """The tiny training step on v5e:2x2, a pure data mesh."""
    return plan.plan_train(load_config("tiny_train", [FAST]), "v5e:2x2", inputs="cached")


def test_train_step_compiles_for_v5e_with_every_field(data_plan):
    (rep,) = data_plan
    assert set(plan.PLAN_FIELDS) <= set(rep), set(plan.PLAN_FIELDS) - set(rep)
    assert rep["chip"] == "TPU v5e" and rep["chips"] == 4 and rep["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert rep["per_chip_batch"] == 16 / 4 and rep["fits"] and rep["dominant"] == []
    hbm = rep["hbm_per_chip_gib"]
    assert 0 < hbm["arguments"] and 0 < hbm["temporaries"] and hbm["capacity"] == 16.0
    assert abs(hbm["peak"] - (hbm["arguments"] + hbm["outputs"] - hbm["aliased"] + hbm["temporaries"]
                              + hbm["program"])) < 0.005
    assert hbm["aliased"] > 0.9 * hbm["outputs"]  # the state is donated: its outputs reuse its buffers
    # the cost model answers; the matmul/conv count is close to the compiler's FLOPs (no remat here)
    assert rep["step_seconds"] > 0 and rep["images_per_s_per_chip"] == pytest.approx(4 / rep["step_seconds"])
    assert 0.7 < rep["model_flops_per_chip"] / rep["flops_per_chip"] <= 1.05
    assert 0 < rep["mfu"] < 1 and rep["bound"] in ("compute", "hbm", "collectives")


def test_data_mesh_has_only_the_gradient_reduction(data_plan):
    """Pure data parallelism: the gradients (and the scalar metrics) are all-reduced, nothing else moves."""
    (rep,) = data_plan
    assert set(rep["collectives"]) == {"all-reduce"}, rep["collectives"]
    params_bytes = rep["buffers_per_chip_gib"]["state.params"] * plan.GiB
    assert params_bytes * 0.9 < rep["collectives"]["all-reduce"]["bytes"] < params_bytes * 1.2


@pytest.fixture(scope="module")
def fsdp_search():
    """The search on v4:2x2x1 over an fsdp=4 mesh; its finalist is the plain step (remat none, no
    accumulation) with the params, EMA and optimizer state sharded four ways."""
    config = load_config("tiny_train", [FAST])
    return config, plan.search(config, "v4:2x2x1", fsdp=[4], remats=("none", "full"), accum=(1, 2), finalists=1,
                               inputs="cached")


def test_fsdp_shards_the_state_on_v4(data_plan, fsdp_search):
    """v4:2x2x1 with fsdp=4: each chip holds ~1/4 of the params, EMA and optimizer state."""
    config, out = fsdp_search
    rep = out["best"]
    assert rep["chip"] == "TPU v4" and rep["chips"] == 4 and rep["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert (rep["remat"], rep["grad_accum_steps"]) == ("none", 1)
    from ldm_jax.train import make_task

    task = make_task(plan._plan_config(config))
    task.start()
    full, _ = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    unsharded = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(full.params))
    per_chip = rep["buffers_per_chip_gib"]["state.params"] * plan.GiB
    assert 0.2 < per_chip / unsharded < 0.32, (per_chip, unsharded)
    # the compiler agrees, short of a quarter because TPU layouts pad the tiny model's small arrays to
    # (8, 128) tiles, whose shards pad more
    assert rep["hbm_per_chip_gib"]["arguments"] < 0.45 * data_plan[0]["hbm_per_chip_gib"]["arguments"]
    kinds = set(rep["collectives"])
    assert "all-gather" in kinds and ("reduce-scatter" in kinds or "all-reduce" in kinds), kinds


def test_sampling_loop_compiles_data_parallel():
    config = load_config("tiny", [])
    rep = plan.plan_sample(config, "v5e:2x2", batch=4, steps=3, height=16, width=16)
    assert rep["what"] == "sample" and rep["chips"] == 4 and rep["fits"]
    assert rep["step_seconds"] > 0 and rep["images_per_s_per_chip"] == pytest.approx(1 / rep["step_seconds"])
    assert rep["model_flops_per_chip"] > 0 and 0 < rep["mfu"] < 1
    # params are replicated, the batch is split: no collective moves activations
    assert not {"all-gather", "all-to-all"} & set(rep["collectives"])


def test_count_flops_matches_the_definition():
    x = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    assert plan.count_flops(jax.make_jaxpr(jnp.dot)(x, w)) == 2 * 8 * 32 * 16
    img = jax.ShapeDtypeStruct((2, 10, 10, 4), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)
    conv = lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert plan.count_flops(jax.make_jaxpr(conv)(img, k)) == 2 * (2 * 10 * 10 * 6) * (3 * 3 * 4)
    # a scan counts its body length times; a gradient adds the backward matmuls
    scanned = lambda a, b: jax.lax.scan(lambda c, _: (jnp.dot(c, b), None), a, None, 5)[0]  # noqa: E731
    sq = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    assert plan.count_flops(jax.make_jaxpr(scanned)(jax.ShapeDtypeStruct((8, 32), jnp.float32), sq)) == 5 * 2 * 8 * 32 * 32
    grad = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(jnp.dot(a, b))))(x, w)
    assert plan.count_flops(grad) == 2 * (2 * 8 * 32 * 16)  # the forward, and d/da = ones @ b.T (not d/db)


def test_bad_topologies_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown TPU generation"):
        plan.chip("v9x:2x2")
    with pytest.raises(ValueError, match="GENERATION:AxB"):
        plan.topology_devices("v5e-8")


def test_cli_prints_the_report_as_json(capsys):
    from ldm_jax.cli import main

    assert main(["plan", "--config", "tiny", "--what", "sample", "--topology", "v5e:1x1", "--batch", "2",
                 "--steps", "2", "--height", "16", "--width", "16", "--dtype", "float32"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    rep = json.loads(line)
    assert rep["what"] == "sample" and rep["chips"] == 1 and rep["batch"] == 2 and rep["dtype"] == "float32"
    assert rep["fits"] and rep["images_per_s_per_chip"] > 0


def test_search_ranks_candidates_and_compiles_the_best(fsdp_search):
    _, out = fsdp_search
    cands = out["candidates"]
    assert len(cands) == 2 * 2 and out["chips"] == 4 and out["global_batch"] == 16
    assert {c["micro_batch_per_chip"] for c in cands} == {4, 2}
    rates = [c["estimated_images_per_s_per_chip"] for c in cands if c["fits_estimate"]]
    assert rates == sorted(rates, reverse=True)
    by = {(c["remat"], c["grad_accum_steps"]): c for c in cands}
    # remat recomputes the forward (its memory saving shows at full size: docs/plan.md)
    assert by["full", 1]["flops_per_chip"] > 1.1 * by["none", 1]["flops_per_chip"]
    (best,) = out["finalists"]
    assert best is out["best"] and best["fits"] and set(plan.PLAN_FIELDS) <= set(best)
    # the finalist's compiled peak calibrates the estimates (on the tiny model the compiled program and
    # TPU tile padding dominate it, so the raw estimate is far off; docs/plan.md has the full-size check)
    peak = best["hbm_per_chip_gib"]["peak"]
    assert best["estimate_error"] == pytest.approx(peak / best["estimated_peak_gib"] - 1, abs=0.02)
    top = next(c for c in cands if (c["remat"], c["mesh"], c["grad_accum_steps"]) ==
               (best["remat"], best["mesh"], best["grad_accum_steps"]))
    assert top["calibrated_peak_gib"] == pytest.approx(peak, rel=0.02)
    assert out["timing"]["estimates_seconds"] > 0 and out["timing"]["finalists_seconds"] > 0

def test_pallas_kernels_count_per_grid_point_and_uncosted_ones_are_found():
    """The flash kernel's body runs once per grid point; jax's backward kernels carry no cost estimate
    (XLA's cost model would count them as free), the forward one does."""
    from ldm_jax.models.pallas_attention import flash_attention

    q = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.float32)
    loss = lambda a, b, c: jnp.sum(flash_attention(a, b, c))  # noqa: E731
    ideal = 2 * 2 * (2 * 2 * 256 * 256 * 64)  # q.k and p.v (2 FLOPs per multiply-add), 2 rows x 2 heads
    forward = jax.make_jaxpr(loss)(q, q, q)
    assert plan.count_flops(forward) == ideal and plan.uncosted_kernel_flops(forward) == 0
    grad = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q)
    assert plan.uncosted_kernel_flops(grad) == plan.count_flops(grad) - ideal >= 2 * ideal


class Compiled:
    """What _analyse reads of a compiled program."""

    def __init__(self, flops=9e13):
        self.flops = flops

    def memory_analysis(self):
        return type("M", (), dict(argument_size_in_bytes=14 * plan.GiB, output_size_in_bytes=13 * plan.GiB,
                                  alias_size_in_bytes=13 * plan.GiB, temp_size_in_bytes=40 * plan.GiB,
                                  generated_code_size_in_bytes=plan.GiB))()

    def cost_analysis(self):
        return {"flops": self.flops, "bytes accessed": 5e11, "optimal_seconds": 0.4}

    def as_text(self):
        return "%all-reduce.1 = f32[1024,320]{1,0} all-reduce(f32[1024,320]{1,0} %x), replica_groups={}"


def test_a_plan_that_does_not_fit_names_what_dominates():
    buffers = {"state.opt_state": 6 * plan.GiB, "state.params": 3 * plan.GiB, "aux.text": plan.GiB}
    rep = plan._report(plan._analyse(Compiled()), plan.CHIPS["v5e"], images_per_chip=32, model_flops_per_chip=8e13,
                       buffers=buffers, lower_s=1, compile_s=2, uncosted_flops=197e11)
    assert rep["hbm_per_chip_gib"]["peak"] == 55 and not rep["fits"]
    assert rep["dominant"] == ["temporaries", "state.opt_state", "state.params"]
    # the cost model's 0.4 s, plus the kernels it has no estimate for at the chip's peak
    assert rep["step_seconds"] == pytest.approx(0.5) and rep["step_time_from"] == "cost model"
    assert rep["collectives"] == {"all-reduce": {"count": 1, "bytes": 1024 * 320 * 4}}


@pytest.mark.parametrize("name", ["tiny_train", "tiny_autoencoder"])
def test_batch_spec_is_the_shape_of_a_real_batch(name):
    """What the plan compiles for is what the trainer feeds (keys, shapes, dtypes), read without data."""
    from ldm_jax.train import make_task

    task = make_task(plan._plan_config(load_config(name, ["--config.data.source=synthetic"])))
    task.start()
    stage = task.stages()[0]
    real = next(iter(task.batches(stage, (0, stage.batch_size), None)))
    spec = task.batch_spec(stage)
    # (the synthetic source also gives the autoencoder captions, which its step does not read)
    assert {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in spec.items()} == \
        {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in real.items() if k in spec}
    assert set(real) - set(spec) <= ({"input_ids"} if name == "tiny_autoencoder" else set())


def test_a_loop_counted_once_is_scaled_by_its_trips():
    """XLA's cost analysis counts a while loop's body once (gradient accumulation, the denoising loop)."""
    kw = dict(images_per_chip=32, model_flops_per_chip=8e13, buffers={}, lower_s=1, compile_s=2)
    once = plan._report(plan._analyse(Compiled(flops=2.4e13)), plan.CHIPS["v5p"], loop_trips=4, **kw)  # remat'd body: 1.2x / 4
    assert once["flops_per_chip"] == pytest.approx(9.6e13) and once["step_seconds"] == pytest.approx(1.6)
    assert once["hbm_bytes_per_chip"] == pytest.approx(2e12)
    whole = plan._report(plan._analyse(Compiled(flops=9.6e13)), plan.CHIPS["v5p"], loop_trips=4, **kw)  # already counted whole
    assert whole["flops_per_chip"] == pytest.approx(9.6e13) and whole["step_seconds"] == pytest.approx(0.4)


def test_a_rerun_reads_the_analysis_of_the_identical_program(tmp_path):
    """JAX's persistent cache cannot load an executable compiled for devices it does not have; the plan
    keeps the analysis of each compiled program under the cache directory instead, keyed by the program."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = plan.topology_devices("v5e:2x2")
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(Mesh(np.asarray(devices), ("data",)), P("data")))
    lower = lambda k: jax.jit(lambda a: jnp.sum(jnp.tanh(a) * k)).lower(x)  # noqa: E731
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:
        first, again, other = (plan._compile(lower(k), "v5e:2x2") for k in (2.0, 2.0, 3.0))
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
    assert (first[2], again[2], other[2]) == (False, True, False)
    assert again[:2] == first[:2] and first[0]["memory"]["arguments"] > 0 and first[0]["cost"]["flops"] > 0
    assert len(os.listdir(tmp_path / "plan")) == 2 and jax.config.jax_enable_compilation_cache
    # a damaged entry is compiled again, not trusted
    for name in os.listdir(tmp_path / "plan"):
        (tmp_path / "plan" / name).write_text("{")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:
        assert plan._compile(lower(2.0), "v5e:2x2")[0] == first[0]
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
