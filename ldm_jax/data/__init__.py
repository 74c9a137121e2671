"""Image-caption data: sources, the ``shapes_captions`` dataset, grain pipelines, cached latents, and
:func:`make_batches`, the one dispatcher from a data config to training batches."""
from ldm_jax.data.batches import make_batches
from ldm_jax.data.latents import (CachedLatentsSource, ModelEncoder, encode_dataset, make_latents_iterator,
                                  sample_latents)
from ldm_jax.data.pipeline import DataIterator, DevicePrefetchIterator, make_dataset, make_iterator
from ldm_jax.data.sources import FolderSource, TarShardSource, TfdsSource, make_source, shapes_source, source_from_spec
from ldm_jax.data.synthetic import SyntheticCaptions
from ldm_jax.data.transforms import decode_image, per_host_batch_size, preprocess_image

__all__ = [
    "DataIterator", "DevicePrefetchIterator", "decode_image", "make_dataset", "make_iterator",
    "per_host_batch_size", "preprocess_image", "FolderSource", "TarShardSource", "TfdsSource",
    "make_source", "shapes_source", "source_from_spec", "CachedLatentsSource", "ModelEncoder", "encode_dataset",
    "make_latents_iterator", "sample_latents", "SyntheticCaptions", "make_batches",
]
