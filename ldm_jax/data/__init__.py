"""Image-caption data: sources, the ``shapes_captions`` dataset, grain pipelines, cached latents."""
from ldm_jax.data.latents import CachedLatentsSource, encode_dataset, make_latents_iterator, sample_latents
from ldm_jax.data.pipeline import (DataIterator, DevicePrefetchIterator, decode_image, make_dataset,
                                   make_iterator, per_host_batch_size, preprocess_image)
from ldm_jax.data.sources import FolderSource, TarShardSource, TfdsSource, shapes_source

__all__ = [
    "DataIterator", "DevicePrefetchIterator", "decode_image", "make_dataset", "make_iterator",
    "per_host_batch_size", "preprocess_image", "FolderSource", "TarShardSource", "TfdsSource",
    "shapes_source", "CachedLatentsSource", "encode_dataset", "make_latents_iterator", "sample_latents",
]
