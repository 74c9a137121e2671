"""DreamBooth with prior preservation through the one training loop: class images generated once from the
model before training, batches half instance / half class with the prior loss weight. (The effect of the
prior loss needs a model whose samples follow its prompts: the demo test's model, in
test_demo.py::test_finetuning_teaches_the_demo_model_a_new_word; the full-size demo's, docs/finetune.md.)"""
import os

import jax
import numpy as np
import pytest

from ldm_jax.config_utils import load_config
from ldm_jax.train import diffusion_task as D
from ldm_jax.train import dreambooth

FAST = {"xla_backend_optimization_level": 0}
INSTANCE, CLASS = "a photo of sks square", "a photo of a square"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from ldm_jax.reference import write_reference_folder

    return write_reference_folder(str(tmp_path_factory.mktemp("base") / "model"), "v1", seed=0)


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    """Five images of one subject: a red square on grey."""
    from PIL import Image

    path = tmp_path_factory.mktemp("instance")
    for i in range(5):
        img = np.full((24, 24, 3), 128, np.uint8)
        img[4 + i:16 + i, 6:18] = (230, 20, 20)
        Image.fromarray(img).save(path / f"{i}.jpg")
    return str(path)


def _config(folder, instance_dir, **db):
    c = load_config("tiny_dreambooth", [f"--config.init.pretrained={folder}", f"--config.data.path={instance_dir}",
                                        f"--config.dreambooth.instance_prompt={INSTANCE}",
                                        f"--config.dreambooth.class_prompt={CLASS}"])
    c.train.update(dict(progress=False, tensorboard=False, log_every=1, compiler_options=FAST))
    c.dreambooth.update(db)
    c.mesh = dict(data=2)
    return c


def test_class_images_are_generated_once_and_batches_mix_them_with_the_prior_weight(folder, instance_dir, tmp_path):
    work = str(tmp_path / "run")
    c = _config(folder, instance_dir)
    c.stages = [dict(resolution=16, steps=4, batch_size=8)]
    state, hist = D.train(c, work, devices=jax.devices()[:2])
    assert int(state.step) == 4 and all(np.isfinite(h["loss"]) for h in hist)
    made = dreambooth.list_images(os.path.join(work, dreambooth.CLASS_DIR))
    assert [os.path.basename(p) for p in made] == [f"class_{i:05d}.png" for i in range(16)]
    stamps = [os.path.getmtime(p) for p in made]
    again = D.train(c, work, devices=jax.devices()[:2])  # a restart of the finished run: the images are reused
    assert [os.path.getmtime(p) for p in made] == stamps and int(again.state.step) == 4
    c = _config(folder, instance_dir, prior_loss_weight=0.5)
    task = D.DiffusionTask(c)
    task.start()
    stage = task.stages()[0]
    source = task.batches(stage, (0, 8), work)
    batch = next(source)
    tok = D.prompt_tokenizer(task.config)
    np.testing.assert_array_equal(batch["input_ids"][:4], np.broadcast_to(tok([INSTANCE]), (4, 77)))
    np.testing.assert_array_equal(batch["input_ids"][4:], np.broadcast_to(tok([CLASS]), (4, 77)))
    np.testing.assert_array_equal(batch["loss_weight"], [2, 2, 2, 2, 1, 1, 1, 1])  # mean = inst + 0.5 class
    assert batch["image"].shape == (8, 16, 16, 3)
    state = source.get_state()
    after = next(source)
    again = task.batches(stage, (4, 8), work)  # another process's rows, resumed at the same position
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["image"], after["image"][4:])
    assert task.batch_spec(stage)["loss_weight"].shape == (8,)


def test_bad_dreambooth_input_is_a_clear_error(folder, instance_dir, tmp_path):
    with pytest.raises(ValueError, match="instance_prompt is empty"):
        D.train(_config(folder, instance_dir, instance_prompt=""), str(tmp_path / "a"), devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="holds no instance images"):
        D.train(_config(folder, str(tmp_path / "empty")), str(tmp_path / "b"), devices=jax.devices()[:2])
    c = _config(folder, instance_dir, class_data_dir=str(tmp_path / "classes"))
    c.stages = [dict(resolution=16, steps=2, batch_size=5)]
    c.mesh = dict(data=1)
    with pytest.raises(ValueError, match="batch size must be even"):
        D.train(c, str(tmp_path / "c"), devices=jax.devices()[:1])


def test_dreambooth_with_lora_adapters(folder, instance_dir, tmp_path):
    """``train.trainable=lora``: the class images come from the frozen base UNet, only adapters train."""
    from ldm_jax.models import lora as L

    c = _config(folder, instance_dir, num_class_images=8)
    c.train.trainable = "lora"
    c.stages = [dict(resolution=16, steps=4, batch_size=8)]
    work = str(tmp_path / "run")
    state, hist = D.train(c, work, devices=jax.devices()[:2])
    assert len(dreambooth.list_images(os.path.join(work, dreambooth.CLASS_DIR))) == 8
    assert set(state.params) == {"unet", "text_encoder"} and L.num_params(state.params) > 0
    assert int(state.step) == 4 and all(np.isfinite(h["loss"]) for h in hist)
