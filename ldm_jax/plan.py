"""Ahead-of-time plans: the training step and the sampling loop compiled for a TPU topology you do
not have, with the compiler's own memory and cost figures.

``libtpu`` (installed by ``jax[tpu]``; in the test extra) holds the TPU compiler. With
``TPU_SKIP_MDS_QUERY=1`` it describes any topology (``v5e:2x2``, ``v5p:2x2x2``, ``v4:8x8x8``, ...) on
a machine without TPUs, and ``jit(f).lower(abstract sharded arguments).compile()`` runs the real
compiler and partitioner. From the compiled program, per chip:

- memory (``memory_analysis()``): arguments (train state, frozen encoders, batch), outputs, what the
  outputs alias (the donated state), temporaries (activations, gradients), the program itself;
  ``peak = arguments + outputs - aliased + temporaries + program`` against the chip's HBM;
- cost (``cost_analysis()``): FLOPs, HBM bytes and the TPU cost model's step time
  (``optimal_seconds``), plus the FLOPs of Pallas kernels without a cost estimate at the chip's
  peak (the model counts those as free: jax's flash-attention backward), from which images/s/chip
  and MFU (model FLOPs, counted on the program without rematerialisation, over step time and the
  chip's bf16 peak);
- the collectives of the partitioned program (kind, count, bytes) and what bounds the step: compute
  (FLOPs / peak), HBM traffic (bytes / bandwidth) or the collectives (bytes / ICI bandwidth).

What is compiled is exactly what ``ldm-jax train`` runs for the config (:func:`ldm_jax.train.loop.programs`:
state, EMA, optimizer, shardings, remat policy, dtypes, one program per stage's batch and resolution),
with random weights of the config's architectures (``init.pretrained`` is not read), and the
pipeline's jitted denoising loop for sampling. :func:`search` ranks mesh splits, remat policies and
per-chip micro-batches.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax.models.remat import policy_name
from ldm_jax.models.text_encoder import context_width
from ldm_jax.train import loop, make_task, sharding

__all__ = ["Chip", "CHIPS", "chip", "topology_devices", "count_flops", "plan_train", "plan_sample", "search",
           "PLAN_FIELDS"]

GiB = 1 << 30

# What every training plan reports (plan_sample adds its own keys; see the module docstring)
PLAN_FIELDS = ("what", "config", "topology", "chip", "chips", "mesh", "stage", "resolution", "global_batch",
               "per_chip_batch", "grad_accum_steps", "remat", "mu_dtype", "compute_dtype", "attention", "inputs",
               "hbm_per_chip_gib", "fits", "buffers_per_chip_gib", "dominant", "flops_per_chip",
               "model_flops_per_chip", "uncosted_kernel_flops_per_chip", "hbm_bytes_per_chip", "step_seconds",
               "step_time_from", "images_per_s_per_chip", "mfu", "bound", "bound_seconds", "collectives",
               "lower_seconds", "compile_seconds", "compile_cached")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures of a TPU generation (Cloud TPU documentation)."""

    name: str
    hbm_bytes: int
    bf16_flops: float  # peak dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s per chip, all links together


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12, 300e9),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 0.819e12, 200e9),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12, 600e9),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12, 448e9),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


def chip(topology: str) -> Chip:
    """The :class:`Chip` of a topology name (``"v5p:2x2x2"`` -> v5p)."""
    kind = topology.split(":")[0].strip().lower()
    kind = _ALIASES.get(kind, kind)
    if kind not in CHIPS:
        raise ValueError(f"unknown TPU generation in topology {topology!r}; known: {sorted(CHIPS)}")
    return CHIPS[kind]


def _on_tpu_vm() -> bool:
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0") or bool(os.environ.get("TPU_ACCELERATOR_TYPE"))


def topology_devices(topology: str) -> list[jax.Device]:
    """The devices of a TPU topology (``"v5p:2x2x2"``), described by libtpu without a TPU."""
    if not re.fullmatch(r"[a-z0-9]+:\d+(x\d+){1,2}", topology.strip().lower()):
        hint = " (an accelerator type such as v5p-16 counts TensorCores on v4/v5p: name the chip grid)" \
            if re.fullmatch(r"[a-z0-9]+-\d+", topology.strip().lower()) else ""
        raise ValueError(f"topology {topology!r} is not of the form GENERATION:AxB[xC] (e.g. v5e:2x2, v5p:2x2x2)"
                         + hint)
    chip(topology)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise RuntimeError('planning for a TPU needs libtpu: pip install "jax[tpu]==' + jax.__version__ + '"') from None
    if not _on_tpu_vm():
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # do not ask a metadata server there is not
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chips to guard: plans may run side by side
    from jax.experimental import topologies

    try:
        # v4 and v5p chips run their two TensorCores as one device (megacore), as JAX on those TPU VMs does
        kw = {"chip_config_name": "megacore"} if chip(topology) in (CHIPS["v4"], CHIPS["v5p"]) else {}
        dims = [int(d) for d in topology.strip().split(":")[1].split("x")]
        if min(dims[:2]) < 2:  # smaller than a host's default 2x2 chips: the slice is one host's part
            kw["chips_per_host_bounds"] = (min(dims[0], 2), min(dims[1], 2), 1)
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology.strip(), **kw).devices)
    except Exception as e:  # noqa: BLE001 - libtpu's own message says what is wrong
        raise ValueError(f"libtpu cannot describe topology {topology!r}: {str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------- FLOPs


def _dot_flops(eqn) -> float:
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_features = rhs[dn.rhs_spec[0]]
    per_output = math.prod(rhs) / out_features  # kernel window x input features of its group
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _sub_jaxprs(params: dict) -> Iterable:
    for v in params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jax_core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax_core.Jaxpr):
                yield x


def count_flops(jaxpr) -> float:
    """Matmul and convolution FLOPs (2 per multiply-add) of a (closed) jaxpr, through calls,
    rematerialised regions (counted as often as they run), scans (times their length) and
    conditionals (the costliest branch). Elementwise work is left out: it is a rounding error of a
    UNet's FLOPs, and MFU conventionally counts the matmuls."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "pallas_call":  # the kernel body runs once per grid point
            total += math.prod(eqn.params["grid_mapping"].grid) * count_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(count_flops(b) for b in eqn.params["branches"])
        elif name == "while":
            raise ValueError("count_flops: a while loop has no static trip count (count its body and multiply)")
        else:
            times = eqn.params["length"] if name == "scan" else 1
            total += times * sum(count_flops(j) for j in _sub_jaxprs(eqn.params))
    return total


def uncosted_kernel_flops(jaxpr) -> float:
    """FLOPs of the Pallas kernels in a jaxpr that carry no cost estimate for XLA's cost model (jax's
    flash-attention backward kernels, for one): the model counts them as free, so the plan adds them
    to the step time at the chip's peak. Counted per device inside ``shard_map``."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            if eqn.params.get("cost_estimate") is None:
                total += math.prod(eqn.params["grid_mapping"].grid) * count_flops(eqn.params["jaxpr"])
            continue
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        total += times * sum(uncosted_kernel_flops(j) for j in _sub_jaxprs(eqn.params))
    return total


# ------------------------------------------------------------------------------------- reading a compile

_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+"
                         r"(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(", re.M)
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8}
# bytes a chip sends per byte of the op's result, on a ring (all-reduce = reduce-scatter + all-gather)
_WIRE = {"all-reduce": 2.0, "all-gather": 1.0, "reduce-scatter": 1.0, "collective-permute": 1.0, "all-to-all": 1.0}


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {"count": n, "bytes": result bytes}}`` of the collectives in an HLO module's text."""
    out: dict[str, dict[str, int]] = {}
    for m in _COLLECTIVE.finditer(hlo_text):
        shape, kind = m.groups()
        nbytes = sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
                     for dt, dims in _SHAPE.findall(shape))
        entry = out.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
    return out


def _per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return int(total)


def _analyse(compiled) -> dict:
    """What a plan reads of a compiled program: its memory, the cost model's figures and the
    partitioned program's collectives (plain numbers, so :func:`_compile` can keep them)."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = dict(cost or {})
    return {"memory": {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
                       "aliased": int(mem.alias_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
                       "program": int(mem.generated_code_size_in_bytes)},
            "cost": {k: float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed", "optimal_seconds")},
            "collectives": collectives(compiled.as_text())}


def _analysis_cache_dir() -> str | None:
    """Where compiled programs' analyses are kept: ``plan/`` in JAX's persistent compilation cache
    directory when one is set (``ldm-jax`` sets it) and local. JAX's own cache cannot serve a plan:
    an executable compiled for a topology without its devices is written but cannot be read back
    ("PjRtCompiler must be constructed with a Client"), so the plan keeps what it reads instead."""
    root = jax.config.jax_compilation_cache_dir
    if not root or "://" in root:
        return None
    return os.path.join(root, "plan")


def _compile(lowered, topology: str) -> tuple[dict, float, bool]:
    """Compile ``lowered`` for ``topology`` and analyse it, or read the analysis of the identical
    program (its StableHLO, shardings included, the topology, jax and libtpu versions, compiler
    flags) from :func:`_analysis_cache_dir`. Returns (analysis, compile seconds, from the cache)."""
    cache = _analysis_cache_dir()
    path = None
    if cache:
        try:
            libtpu = importlib.metadata.version("libtpu")
        except importlib.metadata.PackageNotFoundError:
            libtpu = ""
        h = hashlib.sha256()
        for part in (topology, jax.__version__, libtpu, os.environ.get("XLA_FLAGS", ""),
                     os.environ.get("LIBTPU_INIT_ARGS", ""), lowered.as_text()):
            h.update(part.encode() + b"\0")
        path = os.path.join(cache, h.hexdigest() + ".json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
                return saved["analysis"], float(saved["compile_seconds"]), True
            except (OSError, ValueError, KeyError) as e:  # a damaged entry: compile again
                logging.warning("plan: ignoring the cached analysis %s (%s)", path, e)
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # (it could not read the executable back)
    try:
        t0 = time.perf_counter()
        analysis = _analyse(lowered.compile())
        seconds = time.perf_counter() - t0
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
    if path:
        os.makedirs(cache, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"analysis": analysis, "compile_seconds": seconds}, f)
        os.replace(tmp, path)  # whole or absent
    return analysis, seconds, False


def _gib(n: float) -> float:
    return float(f"{n / GiB:.4g}")  # 4 significant digits: 36.73, 0.005432


def _report(analysis: dict, the_chip: Chip, *, images_per_chip: float, model_flops_per_chip: float,
            buffers: dict[str, int], lower_s: float, compile_s: float, uncosted_flops: float = 0.0,
            loop_trips: int = 1, cached: bool = False) -> dict:
    """The plan fields every compiled program has (memory, cost, collectives, bound).

    ``loop_trips``: how often the program's main loop runs (denoising steps; gradient-accumulation
    micro-batches). XLA's cost analysis counts a while loop's body once; when the compiled FLOPs show
    that (well under the model's), its FLOPs, bytes and time are scaled by the trips."""
    mem = analysis["memory"]
    args, outs, alias, temps, code = (mem[k] for k in ("arguments", "outputs", "aliased", "temporaries", "program"))
    peak = args + outs - alias + temps + code
    cost = analysis["cost"]
    flops, hbm_bytes, step_s = cost["flops"], cost["bytes accessed"], cost["optimal_seconds"]
    coll = analysis["collectives"]
    wire = sum(_WIRE[k] * v["bytes"] for k, v in coll.items())
    # once-counted loop: compiled FLOPs near model / trips (up to +50% for remat), not near the model's
    if loop_trips > 1 and flops < model_flops_per_chip * (1.5 / loop_trips + 1) / 2:
        flops, hbm_bytes, step_s = flops * loop_trips, hbm_bytes * loop_trips, step_s * loop_trips
    bounds = {"compute": flops / the_chip.bf16_flops, "hbm": hbm_bytes / the_chip.hbm_bandwidth,
              "collectives": wire / the_chip.ici_bandwidth}
    source = "cost model"
    if step_s <= 0:  # no cost model answer (a while loop's program): the largest bound
        step_s, source = max(bounds.values()), "largest bound"
    step_s += uncosted_flops / the_chip.bf16_flops
    largest = sorted({**buffers, "temporaries": temps}.items(), key=lambda kv: -kv[1])
    return {
        "hbm_per_chip_gib": {"arguments": _gib(args), "outputs": _gib(outs), "aliased": _gib(alias),
                             "temporaries": _gib(temps), "program": _gib(code), "peak": _gib(peak),
                             "capacity": _gib(the_chip.hbm_bytes)},
        "fits": peak <= the_chip.hbm_bytes,
        "buffers_per_chip_gib": {k: _gib(v) for k, v in largest},
        "dominant": [k for k, _ in largest[:3]] if peak > the_chip.hbm_bytes else [],
        "flops_per_chip": flops,
        "model_flops_per_chip": model_flops_per_chip,
        "uncosted_kernel_flops_per_chip": uncosted_flops,
        "hbm_bytes_per_chip": hbm_bytes,
        "step_seconds": step_s,
        "step_time_from": source,
        "images_per_s_per_chip": images_per_chip / step_s if step_s else None,
        "mfu": model_flops_per_chip / step_s / the_chip.bf16_flops if step_s else None,
        "bound": max(bounds, key=bounds.get),
        "bound_seconds": bounds,
        "collectives": coll,
        "lower_seconds": round(lower_s, 2),
        "compile_seconds": round(compile_s, 2),
        "compile_cached": cached,
    }


# ------------------------------------------------------------------------------------- training


def _plan_config(config, global_batch: int | None = None, **train):
    """The config the plan compiles: its architectures with random weights, no data read;
    ``global_batch`` replaces every stage's batch size."""
    c = config.copy_and_resolve_references()
    if global_batch:
        if "stages" in c:
            c.stages = [dict(s, batch_size=int(global_batch)) for s in c.stages]
        else:  # one-stage tasks (autoencoder)
            c.train.batch_size = int(global_batch)
    if "init" in c:
        c.init.pretrained = ""
        for key, value in (("unet", "random"), ("random_encoders", True)):
            if key in c.init:
                c.init[key] = value
    if "tokenizer" in c:
        c.tokenizer = None  # the empty prompt's ids from the vocabulary layout (no download)
    if "data" in c and "cached_latents" in c.data:
        c.data.cached_latents = ""  # the batch's form is the plan's `inputs`
    if "distributed" in c:
        c.distributed.enabled = False
    c.train.update(train)
    return c


def _sharded(spec: dict, mesh) -> dict:
    bs = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bs) for k, v in spec.items()}


def _batch_spec(task, stage, inputs):
    return task.batch_spec(stage, inputs) if inputs is not None else task.batch_spec(stage)


def _step_jaxpr(config, stage, inputs, rows: int | None = None, platform: str | None = None, **train):
    """The training step of ``config`` (with ``train`` overrides) traced on the stage's batch, or on
    ``rows`` of it (one chip's share), unsharded; nothing compiled. ``platform``: trace as for that
    platform (``"tpu"``: the attention ``"auto"`` picks there, the Pallas kernel); default the host's."""
    from ldm_jax.models import attention

    task = make_task(_plan_config(config, **train))
    task.start()
    state, aux = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    spec = _batch_spec(task, stage, inputs)
    if rows is not None:
        spec = {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype) for k, v in spec.items()}
    with attention.target_platform(platform or attention.current_platform()):
        return jax.make_jaxpr(task.step)(state, spec, aux)


def _model_flops(config, stage, inputs) -> float:
    """FLOPs of one training step without rematerialisation (the model's forward and backward)."""
    return count_flops(_step_jaxpr(config, stage, inputs, remat="none"))


def _buffers(progs, batch: dict) -> dict[str, int]:
    """Per-chip bytes of the step's arguments by part: each train-state field, each aux entry, the batch."""
    out = {}
    state = progs.abstract_state
    for f in dataclasses.fields(state):
        n = _per_chip_bytes(getattr(state, f.name))
        if n >= 1 << 10:  # not the scalars
            out[f"state.{f.name}"] = n
    aux = progs.abstract_aux
    for k, v in (aux.items() if isinstance(aux, dict) else [("aux", aux)]):
        n = _per_chip_bytes(v)
        if n >= 1 << 10:
            out[f"aux.{k}"] = n
    out["batch"] = _per_chip_bytes(batch)
    return out


def plan_train(config, topology: str, *, inputs: str | None = None, stages: Sequence[int] | None = None,
               global_batch: int | None = None, attention_impl: str | None = None,
               model_flops: bool = True) -> list[dict]:
    """Compile the training step of ``config`` for ``topology`` (one program per stage): a report per
    stage (see the module docstring; :data:`PLAN_FIELDS`).

    ``inputs``: the batch's form for the diffusion task (``"images"`` encoded in the step, ``"cached"``
    latents and text context, ``"latents"``); default: what ``config.data`` gives. ``stages``: the stage
    indices to compile (default all); ``global_batch`` replaces the stages' batch; ``attention_impl`` the
    UNet's attention implementation (default: the config's, else "auto" for the TPU).
    ``model_flops=False`` skips the remat-free trace: MFU then uses the compiled FLOPs (and a
    gradient-accumulation loop's cost cannot be told from its once-counted body).
    """
    from ldm_jax.models import attention

    devices = topology_devices(topology)
    the_chip = chip(topology)
    config = _plan_config(config, global_batch)
    if attention_impl:
        config.unet = dict(config.unet, attention_impl=attention_impl)
    c = config
    task = make_task(c)
    reports = []
    with attention.target_platform(devices[0].platform):
        task.start()
        mesh = sharding.make_mesh(dict(c.mesh), devices)
        progs = loop.programs(task, mesh)
        for stage in task.stages():
            if stages is not None and stage.index not in stages:
                continue
            shards = mesh.shape["data"] * mesh.shape["fsdp"]
            if stage.batch_size % shards:
                raise ValueError(f"stage {stage.index}: global batch {stage.batch_size} does not split over "
                                 f"data x fsdp = {shards}")
            batch = _sharded(_batch_spec(task, stage, inputs), mesh)
            t0 = time.perf_counter()
            traced = progs.step_fn.trace(progs.abstract_state, batch, progs.abstract_aux)
            lowered = traced.lower()
            t1 = time.perf_counter()
            analysis, compile_s, cached = _compile(lowered, topology)
            flops = _model_flops(config, stage, inputs) / len(devices) if model_flops else None
            rep = _report(analysis, the_chip, images_per_chip=stage.batch_size / len(devices),
                          model_flops_per_chip=flops if flops else analysis["cost"]["flops"],
                          buffers=_buffers(progs, batch), lower_s=t1 - t0, compile_s=compile_s, cached=cached,
                          uncosted_flops=uncosted_kernel_flops(traced.jaxpr),
                          loop_trips=int(c.train.get("grad_accum_steps", 1)))
            t = c.train
            reports.append({
                "what": "train", "config": str(c.get("name", "")), "topology": topology, "chip": the_chip.name,
                "chips": len(devices), "mesh": {k: int(v) for k, v in mesh.shape.items()}, "stage": stage.index,
                "resolution": stage.resolution, "global_batch": stage.batch_size,
                "per_chip_batch": stage.batch_size / shards,
                "grad_accum_steps": int(t.get("grad_accum_steps", 1)),
                "remat": policy_name(t.get("remat")), "mu_dtype": str(t.get("mu_dtype", "") or "float32"),
                "compute_dtype": str(t.get("compute_dtype", "")),
                "attention": str(dict(c.unet).get("attention_impl", "auto")) if "unet" in c else "",
                "inputs": inputs or "config", **rep})
            logging.info("plan: %s stage %d on %s: peak %.2f GiB, %.1f images/s/chip", c.get("name"), stage.index,
                         topology, rep["hbm_per_chip_gib"]["peak"], rep["images_per_s_per_chip"] or 0)
    return reports


# ------------------------------------------------------------------------------------- sampling


def plan_sample(config, topology: str, *, batch: int = 1, height: int | None = None, width: int | None = None,
                steps: int = 50, sampler: str = "ddim", guidance: bool = True, dtype: str = "bfloat16",
                attention_impl: str = "auto") -> dict:
    """Compile the pipeline's denoising loop (:func:`ldm_jax.pipeline.denoise_loop`) for ``topology``:
    ``batch`` images of ``height`` x ``width`` px (default the UNet's sample size), ``steps`` steps,
    classifier-free guidance when ``guidance``, data-parallel over the chips as the pipeline runs it
    (params replicated, the batch split when it divides)."""
    from jax.sharding import Mesh

    from ldm_jax.diffusion.samplers import get_sampler_from_config
    from ldm_jax.models import attention
    from ldm_jax.models.unet import unet_from_config
    from ldm_jax.pipeline import LoopSpec, denoise_loop

    devices = topology_devices(topology)
    the_chip = chip(topology)
    dt = jnp.dtype(dtype)
    unet_cfg = dict(config.unet)
    factor = 2 ** (len(tuple(config.vae["block_out_channels"])) - 1)
    height = height or int(unet_cfg["sample_size"]) * factor
    width = width or int(unet_cfg["sample_size"]) * factor
    if height % (8 * factor) or width % (8 * factor) or batch < 1 or steps < 1:
        raise ValueError(f"batch {batch}, {height}x{width} px, {steps} steps: need batch, steps >= 1 and sizes "
                         f"divisible by {8 * factor}")
    unet = unet_from_config(unet_cfg, dtype=dt, attention_impl=attention_impl)
    mesh = Mesh(np.asarray(devices), ("data",))
    rep_sh = NamedSharding(mesh, P())
    rows = lambda n: NamedSharding(mesh, P("data") if n % len(devices) == 0 else P())  # noqa: E731
    c = int(unet_cfg.get("in_channels", 4))
    x = jax.ShapeDtypeStruct((batch, height // factor, width // factor, c), jnp.float32, sharding=rows(batch))
    n_ctx = 2 * batch if guidance else batch
    ctx_dim = context_width(config.text_encoder)
    context = jax.ShapeDtypeStruct((n_ctx, 77, ctx_dim), dt, sharding=rows(n_ctx))
    with attention.target_platform(devices[0].platform):
        params = jax.eval_shape(lambda k: unet.init(k, jnp.zeros(x.shape), jnp.zeros((batch,), jnp.int32),
                                                    jnp.zeros(context.shape))["params"], jax.random.PRNGKey(0))
        params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, dt, sharding=rep_sh), params)
        smp = get_sampler_from_config(sampler, dict(config.scheduler), int(steps))
        spec = LoopSpec(type(smp).__name__, int(steps), bool(guidance), "txt2img")
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=rep_sh)  # noqa: E731
        key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep_sh)
        t0 = time.perf_counter()
        lowered = jax.jit(attention.on_mesh(denoise_loop(unet, spec), mesh)).lower(params, smp, x, context, scalar(jnp.float32),
                                                          scalar(jnp.float32), key, scalar(jnp.int32), {})
        t1 = time.perf_counter()
        analysis, compile_s, cached = _compile(lowered, topology)
        call = jax.make_jaxpr(lambda p, xx, cc: unet.apply({"params": p}, xx, jnp.zeros((n_ctx,), jnp.int32), cc))
        flops = count_flops(call(params, jax.ShapeDtypeStruct((n_ctx,) + x.shape[1:], dt), context)) * steps
    buffers = {"unet_params": _per_chip_bytes(params), "latents": _per_chip_bytes(x),
               "context": _per_chip_bytes(context)}
    rep = _report(analysis, the_chip, images_per_chip=batch / len(devices), model_flops_per_chip=flops / len(devices),
                  buffers=buffers, lower_s=t1 - t0, compile_s=compile_s, loop_trips=steps, cached=cached)
    return {"what": "sample", "config": str(config.get("name", "")), "topology": topology, "chip": the_chip.name,
            "chips": len(devices), "mesh": {"data": len(devices)}, "batch": batch, "height": height, "width": width,
            "steps": steps, "sampler": sampler, "guidance": guidance, "dtype": dt.name, "attention": attention_impl,
            "seconds_per_image_batch": rep["step_seconds"], **rep}


# ------------------------------------------------------------------------------------- search


def _nbytes(aval) -> int:
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return 0
    try:
        return math.prod(shape) * jnp.dtype(dtype).itemsize
    except TypeError:  # PRNG key arrays and other extended dtypes: a few bytes
        return 8 * math.prod(shape)


def peak_live_bytes(jaxpr) -> int:
    """Peak bytes live when a jaxpr's equations run in order, each value freed after its last use
    (arguments included; a call's, remat region's or scan body's own peak on top of its inputs). A
    schedule-free estimate of a program's memory: XLA reorders and fuses, so it is calibrated
    against a full compile in :func:`search`."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    last: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jax_core.Var):
                last[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jax_core.Var):
            last[v] = len(jaxpr.eqns)
    live = {v: _nbytes(v.aval) for v in list(jaxpr.invars) + list(jaxpr.constvars)}
    current = peak = sum(live.values())
    for i, eqn in enumerate(jaxpr.eqns):
        inner = 0
        for sub in _sub_jaxprs(eqn.params):
            inner = max(inner, peak_live_bytes(sub) - sum(_nbytes(v.aval) for v in sub.invars))
        out = sum(_nbytes(v.aval) for v in eqn.outvars)
        peak = max(peak, current + inner + out)
        for v in eqn.outvars:
            if isinstance(v, jax_core.Var) and v in last:
                live[v] = _nbytes(v.aval)
                current += live[v]
        for v in set(x for x in eqn.invars if isinstance(x, jax_core.Var)):
            if last.get(v) == i and v in live:
                current -= live.pop(v)
    return int(peak)


def _wire_bytes_estimate(params_bytes: int, data: int, fsdp: int, accum: int, compute_bytes: int) -> float:
    """Bytes one chip sends per step: FSDP gathers the (compute-dtype) params for the forward and
    the backward of every micro-batch and reduce-scatters the gradients; data parallelism all-reduces
    each chip's gradient shard."""
    wire = 0.0
    if fsdp > 1:
        wire += 2 * accum * compute_bytes * (fsdp - 1) / fsdp + params_bytes * (fsdp - 1) / fsdp
    if data > 1:
        wire += 2 * params_bytes / fsdp * (data - 1) / data
    return wire


def search(config, topology: str, *, stage: int = -1, fsdp: Sequence[int] | None = None,
           remats: Sequence[str] = ("none", "dots", "full"), accum: Sequence[int] = (1, 2, 4),
           finalists: int = 2, inputs: str | None = None, global_batch: int | None = None) -> dict:
    """Rank data x fsdp splits, remat policies and per-chip micro-batches (``grad_accum_steps``) for
    ``config``'s stage ``stage`` on ``topology``, then compile the best ``finalists`` in full.

    The common case is cheap: FLOPs are counted on each policy's traced step (no compile); memory is
    the traced step's peak live bytes at one chip's rows (:func:`peak_live_bytes`) with the unsharded
    state replaced by the chip's shard (exact, from the shardings), scaled by the ratio of compiled to
    estimated peak of the first finalist; step time is the larger of compute at the chip's peak and
    the collectives' bytes over ICI. Returns ``{"candidates": [...] sorted by estimated images/s among
    those estimated to fit, "finalists": [plan reports], "timing": {...}}``.
    """
    devices = topology_devices(topology)
    the_chip, n = chip(topology), len(devices)
    config = _plan_config(config, global_batch)
    base = config
    t0 = time.perf_counter()
    task = make_task(base)
    task.start()
    the_stage = task.stages()[stage]
    batch = the_stage.batch_size
    if batch % n:
        raise ValueError(f"global batch {batch} does not split over {n} chips")
    rows = batch // n
    fsdp = [f for f in (fsdp or [2 ** i for i in range(int(math.log2(n)) + 1)]) if n % f == 0]
    accum = [a for a in accum if rows % a == 0]
    compute_dtype = jnp.dtype(base.train.compute_dtype)

    traced: dict = {}  # (remat, accum) -> (flops at the global batch, peak live bytes at one chip's rows)
    for r in remats:
        for a in accum:
            jaxpr = _step_jaxpr(config, the_stage, inputs, rows, devices[0].platform, remat=r, grad_accum_steps=a)
            traced[r, a] = (count_flops(jaxpr) * n, peak_live_bytes(jaxpr))
    full_state, full_aux = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    args_full = _per_chip_bytes((full_state, full_aux))
    params_bytes = _per_chip_bytes(full_state.params)
    compute_bytes = params_bytes // 4 * compute_dtype.itemsize
    shards: dict = {}
    for f in fsdp:
        c = base.copy_and_resolve_references()
        c.mesh.update(dict(data=n // f, fsdp=f, tensor=1))
        tf = make_task(c)
        tf.start()
        progs = loop.programs(tf, sharding.make_mesh(dict(c.mesh), devices))
        shards[f] = _per_chip_bytes((progs.abstract_state, progs.abstract_aux))
    t1 = time.perf_counter()
    # the traces above stay in JAX's caches (GBs at SD size), and a full compile needs ~18 GB of its own
    jax.clear_caches()
    gc.collect()

    model_flops = traced["none", accum[0]][0] if ("none", accum[0]) in traced else None  # MFU's numerator
    candidates = []
    for (r, a), (flops, live) in traced.items():
        for f in fsdp:
            est_peak = live - args_full + shards[f]
            compute_s = flops / n / the_chip.bf16_flops
            ici_s = _wire_bytes_estimate(params_bytes, n // f, f, a, compute_bytes) / the_chip.ici_bandwidth
            step_s = max(compute_s, ici_s)
            candidates.append({"mesh": {"data": n // f, "fsdp": f, "tensor": 1}, "remat": r, "grad_accum_steps": a,
                               "micro_batch_per_chip": rows // a, "estimated_peak_gib": _gib(est_peak),
                               "flops_per_chip": flops / n,
                               "estimated_step_seconds": step_s, "estimated_images_per_s_per_chip": rows / step_s,
                               "estimated_mfu": (model_flops or flops) / n / step_s / the_chip.bf16_flops,
                               "estimated_bound": "compute" if compute_s >= ici_s else "collectives",
                               "estimated_collective_seconds": ici_s,
                               "_peak": est_peak})
    fit = lambda c, scale=1.0: c["_peak"] * scale <= the_chip.hbm_bytes  # noqa: E731
    # ties in step time go to the least compute (no recomputation the step does not need), then the least
    # communication, then the largest micro-batch (the better use of the chip), then the least memory
    order = lambda c, scale=1.0: (not fit(c, scale), -c["estimated_images_per_s_per_chip"],  # noqa: E731
                                  c["flops_per_chip"], c["estimated_collective_seconds"], c["grad_accum_steps"],
                                  c["_peak"])
    ranked = sorted(candidates, key=order)
    finals, scale = [], None
    for cand in [c for c in ranked if fit(c)][:finalists]:
        c = base.copy_and_resolve_references()
        c.mesh.update(cand["mesh"])
        c.train.update(dict(remat=cand["remat"], grad_accum_steps=cand["grad_accum_steps"]))
        (rep,) = plan_train(c, topology, inputs=inputs, stages=[the_stage.index])
        jax.clear_caches()
        gc.collect()
        peak = rep["hbm_per_chip_gib"]["peak"] * GiB
        rep["estimated_peak_gib"] = cand["estimated_peak_gib"]
        rep["estimate_error"] = round(peak / cand["_peak"] - 1, 4)
        if scale is not None:  # the later finalists check the calibration of the first
            rep["calibrated_error"] = round(peak / (cand["_peak"] * scale) - 1, 4)
        scale = scale or peak / cand["_peak"]
        finals.append(rep)
    t2 = time.perf_counter()
    ranked.sort(key=lambda c: order(c, scale or 1.0))
    for c in ranked:
        c["fits_estimate"] = fit(c, scale or 1.0)
        c["calibrated_peak_gib"] = _gib(c.pop("_peak") * (scale or 1.0))
    finals.sort(key=lambda r: (not r["fits"], -(r["images_per_s_per_chip"] or 0)))
    return {"config": str(base.get("name", "")), "topology": topology, "chips": n, "stage": the_stage.index,
            "global_batch": batch, "candidates": ranked, "finalists": finals,
            "calibration": scale, "best": finals[0] if finals else None,
            "timing": {"estimates_seconds": round(t1 - t0, 1), "finalists_seconds": round(t2 - t1, 1)}}
