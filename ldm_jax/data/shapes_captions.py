"""``shapes_captions``: a tfds builder for the procedural shapes dataset (see ``shapes.py``).

Built offline (no download, no TensorFlow) into ArrayRecord files and read back with
``tfds.data_source``. The builder config names every generation parameter, so two configs never
share files::

    builder = build_shapes_captions("/data/tfds", image_size=64, num_train=4000)
    source = tfds.data_source("shapes_captions/" + builder.builder_config.name, split="train",
                              data_dir="/data/tfds")
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data import shapes as shapes_lib

__all__ = ["ShapesCaptions", "ShapesCaptionsConfig", "shapes_config", "build_shapes_captions"]


@dataclasses.dataclass(eq=False)
class ShapesCaptionsConfig(tfds.core.BuilderConfig):
    """Generation parameters; ``shapes_config`` fills ``name`` from them."""

    image_size: int = 64
    num_train: int = 2000
    num_validation: int = 200
    num_heldout: int = 200
    seed: int = 0
    max_shapes: int = 2
    shape_scale: float = 1.0


def shapes_config(image_size: int = 64, num_train: int = 2000, num_validation: int = 200,
                  num_heldout: int = 200, seed: int = 0, max_shapes: int = 2,
                  shape_scale: float = 1.0) -> ShapesCaptionsConfig:
    """A config whose name encodes all its parameters, e.g. ``s64_n2000-200-200_seed0``."""
    for k, v in (("num_train", num_train), ("num_validation", num_validation), ("num_heldout", num_heldout)):
        if v < 1:
            raise ValueError(f"shapes_captions: {k} must be >= 1, got {v}")
    if max_shapes not in (1, 2):
        raise ValueError(f"shapes_captions: max_shapes must be 1 or 2, got {max_shapes}")
    name = f"s{image_size}_n{num_train}-{num_validation}-{num_heldout}_seed{seed}"
    name += f"_max{max_shapes}" if max_shapes != 2 else ""
    name += f"_scale{shape_scale:g}" if shape_scale != 1.0 else ""
    return ShapesCaptionsConfig(name=name, image_size=image_size, num_train=num_train,
                                num_validation=num_validation, num_heldout=num_heldout, seed=seed,
                                max_shapes=max_shapes, shape_scale=float(shape_scale),
                                description="procedural shapes with captions")


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ShapesCaptions(tfds.core.GeneratorBasedBuilder):
    """Procedural images of 1-2 shapes with captions and attribute labels."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [shapes_config(32, 2000, 200, 200), shapes_config(64, 2000, 200, 200)]
    # Nothing is downloaded, so no checksums file; tfds' default lookup imports the
    # `importlib_resources` backport, which is not a dependency.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        s = cfg.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "num_shapes": np.int32,
                "background": tfds.features.ClassLabel(names=shapes_lib.COLORS),
                "shape": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                "color": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                "size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                "position": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                "center": tfds.features.Tensor(shape=(2, 2), dtype=np.float32),
                "radius": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            }),
            disable_shuffling=True,  # keep generator order: record i of a split is example i
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_validation),
            "heldout": self._generate_examples("heldout", cfg.num_heldout),
        }

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        for i in range(num):
            ex = shapes_lib.make_example(cfg.seed, split, i, cfg.image_size, cfg.max_shapes, cfg.shape_scale)
            ex["image"] = _png(ex["image"])  # PNG via PIL: tfds would need TensorFlow to encode arrays
            yield i, ex


def build_shapes_captions(data_dir: str | os.PathLike, image_size: int = 64, num_train: int = 2000,
                          num_validation: int = 200, num_heldout: int = 200,
                          seed: int = 0, max_shapes: int = 2, shape_scale: float = 1.0) -> ShapesCaptions:
    """Generate (once; reused when already built) and return the prepared builder.

    Files go to ``data_dir/shapes_captions/<config name>/1.0.0/`` as ArrayRecord.
    """
    cfg = shapes_config(image_size, num_train, num_validation, num_heldout, seed, max_shapes, shape_scale)
    if cfg.name in {c.name for c in ShapesCaptions.BUILDER_CONFIGS}:
        cfg = cfg.name  # tfds refuses a new config object named like a predefined one
    builder = ShapesCaptions(data_dir=os.fspath(data_dir), config=cfg, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return builder
