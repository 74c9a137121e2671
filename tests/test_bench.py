"""``ldm_jax.benchmarks``: the sample benchmark (ours vs diffusers' PyTorch) and the ``bench data`` CLI."""
import json
import math

import numpy as np
import pytest

from ldm_jax import benchmarks as bench, cli
from ldm_jax.benchmarks import sample as bench_sample_module


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def sample_result(tmp_path_factory):
    # batch 2 does not split over the 8 simulated devices: the bench runs it on one device
    return bench.bench_sample(config="v1", batch=2, steps=2, repeats=1, peer=True,
                              cache_dir=str(tmp_path_factory.mktemp("bench")))


def test_bench_sample_keys_and_figures(sample_result):
    r = sample_result
    assert (r["model"], r["batch"], r["steps"], r["sampler"]) == ("v1", 2, 2, "ddim")
    assert (r["height"], r["width"]) == (16, 16)
    assert r["device"]["platform"] == "cpu" and r["device"]["num_devices_used"] == 1
    for key in ("jax", "flax", "torch", "diffusers"):
        assert r["versions"][key]
    ours, peer = r["ours"], r["peer"]
    for key in ("first_call_s", "s_per_call", "s_per_image", "s_per_step", "loop_s", "compile_cold_s",
                "first_call_warm_cache_s"):
        assert _positive(ours[key]), (key, ours[key])
    assert ours["compile_warm_cache_s"] >= 0
    assert ours["s_per_image"] == pytest.approx(ours["s_per_call"] / 2)
    # the second process found every compilation in the first one's persistent cache
    assert ours["warm_cache_new_entries"] == 0
    for key in ("first_call_s", "s_per_call", "s_per_image", "s_per_step"):
        assert _positive(peer[key]), (key, peer[key])
    assert r["speedup"] == pytest.approx(peer["s_per_image"] / ours["s_per_image"])
    assert r["speedup_best"] == pytest.approx(min(peer["steady_calls_s"]) / min(ours["steady_calls_s"]))
    # both pipelines did the same work: same images from the same latents (parity bound of the issue)
    assert r["images_mean_abs_diff"] <= 1 / 255
    # each side in its own process, pinned to the same CPUs, same thread count; the load is recorded
    assert r["threads"] == len(r["cpu_affinity"]) >= 1 and peer["torch_threads"] == r["threads"]
    assert len(r["rounds"]) == 1 and r["rounds"][0]["ours"]["pid"] != r["rounds"][0]["peer"]["pid"]
    for side in ("ours", "peer"):
        assert r["rounds"][0][side]["cpu_affinity"] == r["cpu_affinity"]
    assert len(r["load_avg"]["start"]) == len(r["load_avg"]["end"]) == 3
    assert len(ours["steady_calls_s"]) == len(peer["steady_calls_s"]) == r["calls_per_round"]
    assert r["speedup_per_round"][0] == pytest.approx(r["speedup"])
    json.dumps(r)  # JSON-able


def test_bench_sample_alternates_sides_and_reports_every_sample(monkeypatch, tmp_path):
    """Without processes: the order of the worker runs and how their samples are combined."""
    calls = []

    def fake_worker(args, threads, timeout):
        calls.append((args["side"], args["calls"], threads, tuple(args["cpus"])))
        k = len(calls)
        out = {"side": args["side"], "pid": k, "load_s": 0.1, "first_call_s": 5.0 if k == 1 else 1.5,
               "steady_calls_s": [float(k), float(k) + 0.5][: args["calls"]], "cpu_affinity": args["cpus"],
               "others_cpu_frac": 0.2 if k == 2 else 0.0}
        if args["side"] == "ours":
            out.update(new_cache_entries=3 if k == 1 else 0, loop_s=[0.5] * args["calls"], attention_impl="x",
                       compiler_options={"flag": "value"}, dtype="float32",
                       device={"platform": "cpu", "num_devices_used": 1})
            if args.get("images_out"):
                np.save(args["images_out"], np.zeros((1, 2, 2, 3), np.float32))
        else:
            out.update(scheduler="DDIMScheduler", torch_threads=threads, step_s=[0.25] * args["calls"])
            if args.get("images_out"):
                np.save(args["images_out"], np.full((1, 2, 2, 3), 0.5, np.float32))
        return out

    monkeypatch.setattr(bench_sample_module, "_run_worker", fake_worker)
    monkeypatch.setattr(bench_sample_module, "torch_available", lambda: None)
    folder = tmp_path / "model"
    for sub, cfg in (("unet", {"sample_size": 8}), ("vae", {"block_out_channels": [8, 8], "latent_channels": 4})):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "config.json").write_text(json.dumps(cfg))
    r = bench.bench_sample(config=str(folder), repeats=3, calls=2, threads=1, steps=4, batch=2,
                           cache_dir=str(tmp_path / "cache"))
    assert [c[0] for c in calls] == ["ours", "peer"] * 3  # alternating, one process each
    assert {c[2] for c in calls} == {1} and len({c[3] for c in calls}) == 1  # same thread count and CPUs
    assert r["ours"]["steady_calls_s"] == [1.0, 1.5, 3.0, 3.5, 5.0, 5.5]  # every sample kept
    assert r["peer"]["steady_calls_s"] == [2.0, 2.5, 4.0, 4.5, 6.0, 6.5]
    assert r["ours"]["s_per_call"] == 3.25 and r["peer"]["s_per_call"] == 4.25  # medians
    assert r["speedup"] == pytest.approx(4.25 / 3.25)
    assert r["ours"]["best_s_per_call"] == 1.0 and r["peer"]["best_s_per_call"] == 2.0  # fastest calls
    assert r["speedup_best"] == pytest.approx(2.0)
    assert r["speedup_per_round"] == pytest.approx([2.25 / 1.25, 4.25 / 3.25, 6.25 / 5.25])
    assert r["ours"]["compile_cold_s"] == pytest.approx(5.0 - 3.25)
    assert r["ours"]["first_call_warm_cache_s"] == 1.5 and r["ours"]["warm_cache_new_entries"] == 0
    assert r["images_mean_abs_diff"] == pytest.approx(0.5)
    assert r["others_cpu_frac_max"] == 0.2 and "other processes" in r["machine_busy"]
    assert r["ours"]["compiler_options"] == {"flag": "value"}


def test_bench_sample_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown sampler"):
        bench.bench_sample(config="v1", sampler="nope", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown bench option"):
        bench.bench_sample(config="v1", overrides=["--config.nope=1"], cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="neither a model folder"):
        bench.bench_sample(config="not-a-variant", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="threads=0"):
        bench.bench_sample(config="v1", threads=0, cache_dir=str(tmp_path))


def test_bench_train_bad_input():
    # (a full train bench compiles a UNet step and runs the PyTorch peer: minutes on this CPU)
    with pytest.raises(ValueError, match="steps and rounds must be >= 1"):
        bench.bench_train(steps=0)
    with pytest.raises(ValueError, match="steps and rounds must be >= 1"):
        bench.bench_train(rounds=0)


def test_alternate_rounds_interleaves_the_sides():
    """bench train times ours and the peer in alternating rounds, every call kept."""
    calls = []
    sides = {"ours": lambda: calls.append("ours"), "peer": lambda: calls.append("peer")}
    out = bench.alternate_rounds(sides, steps=2, rounds=3, pause_s=0)
    assert calls == ["ours", "ours", "peer", "peer"] * 3
    assert set(out) == {"ours", "peer"} and all(len(r) == 3 and all(len(x) == 2 for x in r) for r in out.values())
    assert all(t >= 0 for r in out["ours"] for t in r)


def test_cli_bench_data_prints_json(capsys):
    assert cli.main(["bench", "data", "--batch", "4", "--config.num_images=8", "--config.image_size=32",
                     "--config.source_size=(64, 48)"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "data" and out["batch_size"] == 4 and out["num_images"] == 8
    assert _positive(out["decode_resize_crop_images_per_s"]) and _positive(out["pipeline_images_per_s"])
