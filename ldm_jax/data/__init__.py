"""Image-caption data: sources, the ``shapes_captions`` dataset, grain pipelines, cached latents."""
from ldm_jax.data.latents import (CachedLatentsSource, encode_dataset, encode_dataset_with_model, make_encode_fn,
                                  make_latents_iterator, sample_latents)
from ldm_jax.data.pipeline import (DataIterator, DevicePrefetchIterator, decode_image, make_dataset,
                                   make_iterator, per_host_batch_size, preprocess_image)
from ldm_jax.data.sources import FolderSource, TarShardSource, TfdsSource, shapes_source, source_from_spec

__all__ = [
    "DataIterator", "DevicePrefetchIterator", "decode_image", "make_dataset", "make_iterator",
    "per_host_batch_size", "preprocess_image", "FolderSource", "TarShardSource", "TfdsSource",
    "shapes_source", "source_from_spec", "CachedLatentsSource", "encode_dataset", "encode_dataset_with_model",
    "make_encode_fn", "make_latents_iterator", "sample_latents",
]
