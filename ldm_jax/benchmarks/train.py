"""``ldm-jax bench train``: the diffusion train step against diffusers' PyTorch UNet + AdamW step,
in alternating rounds in one process."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Sequence

from ldm_jax.benchmarks.common import (alternate_rounds, cost_flops, device_info, matmul_peak_gflops, timed,
                                       torch_available, versions)

__all__ = ["bench_train"]


def _peer_train_step(config, latent_shape_nhwc, ctx_shape) -> tuple[Callable[[], None], dict]:
    """diffusers' PyTorch UNet, AdamW, MSE on eps: (one training step, what it is)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(config.unet).items()})
    unet.train()
    t = config.train
    opt = torch.optim.AdamW(unet.parameters(), lr=float(t.lr), weight_decay=float(t.weight_decay))
    b, h, w, c = latent_shape_nhwc
    x0, ctx = torch.randn(b, c, h, w), torch.randn(*ctx_shape)

    def step():
        noise = torch.randn_like(x0)
        ts = torch.randint(0, 1000, (b,))
        loss = torch.nn.functional.mse_loss(unet(x0 + noise, ts, ctx).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()

    return step, {"name": "diffusers.UNet2DConditionModel (PyTorch) AdamW step", "torch_threads": torch.get_num_threads()}


def bench_train(config: str | None = None, overrides: Sequence[str] = (), batch: int | None = None,
                steps: int | None = None, peer: bool = True, rounds: int = 3) -> dict:
    """Diffusion train-step throughput (:mod:`ldm_jax.train.diffusion_task`) vs diffusers' PyTorch UNet step.

    Args:
      config: a diffusion training config, packaged name or file (default ``tiny_train``); ``overrides`` apply to it.
        The data source is forced to ``synthetic_latents`` (UNet step on precomputed latents, as the peer).
      batch: global batch (default: the first stage's); steps: timed steps per side and round (default 5).
      rounds: rounds of ``steps`` of ours then ``steps`` of the peer, alternating (with a pause
        between sides), so a slow spell of the machine lands on both sides rather than on one.

    Returns: JSON-able dict: ``ours`` (``compile_s``, ``s_per_step`` (median over all rounds),
    ``images_per_s``, ``flops_per_step`` from XLA's cost analysis, ``mfu`` vs ``matmul_peak_gflops``),
    ``peer`` (PyTorch, same UNet config, AdamW, MSE on eps; its MFU uses our FLOP count), ``speedup``
    and ``speedup_per_round``.
    """
    import jax

    from ldm_jax.config_utils import load_config
    from ldm_jax.train import diffusion_task, loop, sharding

    cfg = load_config(config or "tiny_train", overrides)
    cfg.data.source = "synthetic_latents"
    steps = 5 if steps is None else int(steps)
    if steps < 1 or int(rounds) < 1:
        raise ValueError(f"steps and rounds must be >= 1, got steps={steps}, rounds={rounds}")
    if batch is not None:
        cfg.stages = [dict(dict(cfg.stages[0]), batch_size=int(batch))] + list(cfg.stages[1:])
    stage = diffusion_task.get_stages(cfg)[0]
    b = stage.batch_size
    mesh = sharding.make_mesh(dict(cfg.mesh))
    ts = diffusion_task.setup(cfg, mesh)
    local = next(iter(diffusion_task.make_batch_source(cfg, stage, (0, b))))
    gbatch = sharding.make_global_batch(mesh, local, b)
    t0 = time.perf_counter()
    compiled = ts.step_fn.lower(ts.state, gbatch, ts.aux).compile()
    compile_s = time.perf_counter() - t0
    flops = cost_flops(compiled)
    carry = {"state": ts.state}

    def ours_step():
        carry["state"], carry["metrics"] = compiled(carry["state"], gbatch, ts.aux)
        jax.block_until_ready(carry["metrics"])

    ours_step()
    lat = local.get("latents")
    latent_shape = tuple(lat.shape) if lat is not None else (b, stage.resolution, stage.resolution, cfg.unet.in_channels)
    missing = torch_available() if peer else "disabled (--no-peer)"
    peer_step, peer_info = None, None
    if missing is None:
        ctx_shape = (b, int(cfg.text_encoder.get("max_position_embeddings", 77)), int(cfg.unet.cross_attention_dim))
        peer_step, peer_info = _peer_train_step(cfg, latent_shape, ctx_shape)
        peer_info["first_step_s"] = timed(peer_step)[0]
    sides = {"ours": ours_step} if peer_step is None else {"ours": ours_step, "peer": peer_step}
    by_side = alternate_rounds(sides, steps, int(rounds))
    ours_rounds, peer_rounds = by_side["ours"], by_side.get("peer", [])
    times = [t for r in ours_rounds for t in r]
    step_s = statistics.median(times)
    peak = matmul_peak_gflops()
    result: dict[str, Any] = {
        "bench": "train", "config": cfg.name, "batch": b, "steps": steps, "rounds": int(rounds),
        "latent_shape_nhwc": list(latent_shape), "versions": versions(), "device": device_info(jax.devices()),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "matmul_peak_gflops": peak,
        "ours": {"compile_s": compile_s, "s_per_step": step_s, "images_per_s": b / step_s, "step_times_s": times,
                 "flops_per_step": flops, "mfu": flops / step_s / (peak * 1e9) if flops else None,
                 "compute_dtype": cfg.train.compute_dtype,
                 "compiler_options": loop.compiler_options(cfg, mesh.devices.flat[0].platform),
                 "loss": float(carry["metrics"]["loss"])},
    }
    if peer_step is None:
        result["peer"], result["peer_skipped"] = None, missing
        return result
    peer_times = [t for r in peer_rounds for t in r]
    p_step = statistics.median(peer_times)
    result["peer"] = dict(peer_info, s_per_step=p_step, step_times_s=peer_times, images_per_s=b / p_step,
                          mfu=flops / p_step / (peak * 1e9) if flops else None)
    result["speedup"] = p_step / step_s
    result["speedup_per_round"] = [statistics.median(p) / statistics.median(o) for o, p in zip(ours_rounds, peer_rounds)]
    return result
