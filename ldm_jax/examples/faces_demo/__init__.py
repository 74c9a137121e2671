"""``ldm-jax demo --recipe faces``: the text-to-face recipe (``tiny_text2face``) end to end on the
cartoon-faces stand-in for MM-CelebA-HQ (:mod:`ldm_jax.data.faces`, :mod:`.demo`), with the attribute
reader that measures generated faces' prompt adherence (:mod:`.attributes`) and its settings
(``config.py``)."""
from ldm_jax.examples.faces_demo.demo import CONFIG, run_faces_demo

__all__ = ["CONFIG", "run_faces_demo"]
