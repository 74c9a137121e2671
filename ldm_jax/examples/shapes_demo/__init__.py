"""``make demo``: a text-to-image model trained from nothing on CPU on the built-in ``shapes_captions``
(:mod:`.demo`), with its attribute classifier (:mod:`.attributes`), the text-encoder pretraining
that stands in for CLIP's (:mod:`.text_pretrain`) and its recipe (``config.py``)."""
from ldm_jax.examples.shapes_demo.demo import CONFIG, run_demo

__all__ = ["CONFIG", "run_demo"]
