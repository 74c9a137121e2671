"""``ldm_jax.bench``: the sample benchmark (ours vs diffusers' PyTorch) and the ``bench data`` CLI."""
import json
import math

import pytest

from ldm_jax import bench, cli


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
    # both pipelines did the same work: same images from the same latents (parity bound of the issue)
    assert r["images_mean_abs_diff"] <= 1 / 255
    json.dumps(r)  # JSON-able


def test_bench_sample_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown sampler"):
        bench.bench_sample(config="v1", sampler="nope", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown bench option"):
        bench.bench_sample(config="v1", overrides=["--config.nope=1"], cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="neither a model folder"):
        bench.bench_sample(config="not-a-variant", cache_dir=str(tmp_path))


def test_bench_train_bad_input():
    # (a full train bench compiles a UNet step and runs the PyTorch peer: minutes on this CPU)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        bench.bench_train(steps=0)


def test_cli_bench_data_prints_json(capsys):
    assert cli.main(["bench", "data", "--batch", "4", "--config.num_images=8", "--config.image_size=32",
                     "--config.source_size=(64, 48)"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "data" and out["batch_size"] == 4 and out["num_images"] == 8
    assert _positive(out["decode_resize_crop_images_per_s"]) and _positive(out["pipeline_images_per_s"])
