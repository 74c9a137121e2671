"""The command line and config loading (thin layers over the Python API)."""
import json

import pytest

from ldm_jax.cli import main
from ldm_jax.config_utils import load_config, parse_value


def test_config_overrides_apply_and_check_types():
    c = load_config("configs/tiny.py", ["--config.sample.guidance_scale=3", "--config.unet.block_out_channels=(16,32)",
                                        "--config.sample.sampler=euler"])
    assert c.sample.guidance_scale == 3.0 and isinstance(c.sample.guidance_scale, float)
    assert tuple(c.unet.block_out_channels) == (16, 32)
    assert c.sample.sampler == "euler"
    with pytest.raises(KeyError, match="no field"):
        load_config("configs/tiny.py", ["--config.sample.nonexistent=1"])
    with pytest.raises(FileNotFoundError):
        load_config("configs/nope.py")


def test_parse_value():
    assert parse_value("1e-4") == 1e-4 and parse_value("true") is True and parse_value("none") is None
    assert parse_value("(256, 512)") == (256, 512) and parse_value("ddim") == "ddim"


def test_every_shipped_config_loads():
    import glob

    for path in sorted(glob.glob("configs/*.py")):
        assert load_config(path) is not None, path


def test_cli_convert_folder_round_trip(tmp_path, capsys):
    from ldm_jax.convert import load_model
    from ldm_jax.reference import write_reference_folder

    src = write_reference_folder(str(tmp_path / "src"), "v1")
    main(["convert", src, str(tmp_path / "out")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == str(tmp_path / "out")
    a, b = load_model(src), load_model(str(tmp_path / "out"))
    import jax
    import numpy as np

    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)


def test_cli_rejects_overrides_where_they_mean_nothing(tmp_path):
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--config.x=1"])
