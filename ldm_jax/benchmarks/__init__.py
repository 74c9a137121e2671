"""Benchmarks against a peer (``ldm-jax bench sample|train|data|serve``: diffusers' PyTorch, or for
``serve`` the same server one image per call), printed as JSON; built on the library's public API (the
library itself never imports them)."""
from ldm_jax.benchmarks.common import alternate_rounds, matmul_peak_gflops
from ldm_jax.benchmarks.data import bench_data
from ldm_jax.benchmarks.sample import bench_sample
from ldm_jax.benchmarks.serve import bench_serve
from ldm_jax.benchmarks.train import bench_train

__all__ = ["alternate_rounds", "bench_data", "bench_sample", "bench_serve", "bench_train", "matmul_peak_gflops"]
