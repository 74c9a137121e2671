"""Serving the pipeline over HTTP (``ldm-jax serve``): :mod:`~ldm_jax.serve.batcher` (dynamic batching on
the jitted loop) and :mod:`~ldm_jax.serve.app` (the web UI's API, metrics, a web page)."""
