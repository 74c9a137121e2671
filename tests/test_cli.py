"""The command line and config loading (thin layers over the Python API)."""
import json

import pytest

from ldm_jax.cli import main
from ldm_jax.config_utils import load_config, parse_value


def test_config_overrides_apply_and_check_types():
    c = load_config("tiny", ["--config.sample.guidance_scale=3", "--config.unet.block_out_channels=(16,32)",
                             "--config.sample.sampler=euler"])
    assert c.sample.guidance_scale == 3.0 and isinstance(c.sample.guidance_scale, float)
    assert tuple(c.unet.block_out_channels) == (16, 32)
    assert c.sample.sampler == "euler"
    with pytest.raises(KeyError, match="no field"):
        load_config("tiny", ["--config.sample.nonexistent=1"])
    with pytest.raises(FileNotFoundError, match="neither a file nor a packaged recipe"):
        load_config("configs/nope.py")
    with pytest.raises(FileNotFoundError, match="sd_v1_train"):  # the message lists the recipes
        load_config("nope")


def test_parse_value():
    assert parse_value("1e-4") == 1e-4 and parse_value("true") is True and parse_value("none") is None
    assert parse_value("(256, 512)") == (256, 512) and parse_value("ddim") == "ddim"


def test_every_shipped_config_loads_by_name_and_by_path():
    """The recipes ship inside the package (an installed copy has them) and load by name or path."""
    import os

    import ldm_jax.configs
    from ldm_jax.config_utils import config_names

    names = config_names()
    assert {"sd_v1", "sd_v2", "tiny", "sd_v1_train", "tiny_train", "sd_autoencoder", "tiny_autoencoder"} <= set(names)
    for name in names:
        by_name = load_config(name)
        by_path = load_config(os.path.join(os.path.dirname(ldm_jax.configs.__file__), name + ".py"))
        assert by_name.to_dict() == by_path.to_dict(), name
    for name in ("sd_v1_train", "tiny_train", "sd_autoencoder", "tiny_autoencoder"):  # training recipes name a task
        assert load_config(name).task in ("diffusion", "autoencoder")


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


def test_an_installed_copy_ships_the_recipes(tmp_path):
    """A built wheel holds the recipes and the demo's: ``ldm-jax train --config sd_v1_train`` works
    from any directory with an installed (not editable, not the checkout) copy of the package."""
    import os
    import subprocess
    import sys
    import zipfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "pip", "wheel", root, "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("ldm_jax-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import ldm_jax; from ldm_jax.config_utils import load_config; "
            "from ldm_jax.examples.shapes_demo import CONFIG; "
            "print(ldm_jax.__file__, load_config('sd_v1_train').task, load_config('tiny_autoencoder:vq').name, "
            "load_config(CONFIG).time_budget_s)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    path, task, vq, budget = out.stdout.split()
    assert path.startswith(str(site)) and (task, vq, budget) == ("diffusion", "tiny_autoencoder_vq", "1200")
