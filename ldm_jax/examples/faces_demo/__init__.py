"""The cartoon-faces stand-in for MM-CelebA-HQ text-to-face (:mod:`ldm_jax.data.faces`): the attribute
reader that measures generated faces' prompt adherence (:mod:`.attributes`)."""
