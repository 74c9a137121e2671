"""Device mesh, parameter sharding rules (FSDP) and global batches from host-local data.

The same code runs on one CPU, simulated CPU devices, a TPU pod or a GPU cluster: the mesh axes
come from the config (``data``, ``fsdp``, optional ``tensor``), parameters are sharded by rules on
their names (default: the largest dimension divisible by the ``fsdp`` size) and the batch is split
over ``("data", "fsdp")``.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "MESH_AXES",
    "BATCH_AXES",
    "make_mesh",
    "param_partition_specs",
    "param_shardings",
    "config_param_shardings",
    "batch_sharding",
    "replicated",
    "local_batch_rows",
    "make_global_batch",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over ``devices`` (default: all) with axes ``data``, ``fsdp``, ``tensor``.

    ``axes`` maps axis name -> size; one size may be ``-1`` (takes the remaining devices);
    missing axes get size 1. Example: ``{"data": 2, "fsdp": 4}`` on 8 devices.
    """
    axes = dict(axes or {"data": -1})
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {axes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split over mesh axes {axes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    # Auto axes: shardings are given at jit boundaries and XLA propagates them inside.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def _default_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
    """FSDP: shard the largest dimension divisible by the fsdp size; with a tensor axis, also shard
    the last (output-feature) dimension of a kernel over it when divisible."""
    spec: list[Any] = [None] * len(shape)
    if int(np.prod(shape, dtype=np.int64)) < min_size or not shape:
        return P(*spec)
    tensor = mesh.shape.get("tensor", 1)
    if tensor > 1 and len(shape) >= 2 and shape[-1] % tensor == 0:
        spec[-1] = "tensor"
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], i))] = "fsdp"
    return P(*spec)


def param_partition_specs(params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = (),
                          min_size: int = 2 ** 14) -> Any:
    """PartitionSpecs for a params pytree (arrays or ShapeDtypeStructs).

    ``rules``: ``(regex, spec)`` pairs matched (``re.search``) against the '/'-joined param path,
    first match wins; ``spec`` is a tuple of axis names/None (``()`` replicates). Unmatched params
    use the default FSDP rule; params with fewer than ``min_size`` elements are replicated.
    """
    compiled = [(re.compile(r), P(*s)) for r, s in rules]

    def spec_for(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for rx, spec in compiled:
            if rx.search(name):
                if len(spec) > len(leaf.shape):
                    raise ValueError(f"rule {rx.pattern!r} gives {spec} for {name} of shape {leaf.shape}")
                return spec
        return _default_spec(tuple(leaf.shape), mesh, min_size)

    return jax.tree_util.tree_map_with_path(spec_for, params)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = (),
                    min_size: int = 2 ** 14) -> Any:
    """NamedShardings for a params pytree (see :func:`param_partition_specs`)."""
    specs = param_partition_specs(params, mesh, rules, min_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def config_param_shardings(tree: Any, mesh: Mesh, sharding_config: Mapping[str, Any]) -> Any:
    """:func:`param_shardings` with a config's ``sharding`` section (``rules``, ``min_size``)."""
    return param_shardings(tree, mesh, tuple(sharding_config["rules"]), int(sharding_config["min_size"]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` and ``fsdp``; other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_batch_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """``[start, stop)`` rows of a global batch this process feeds under :func:`batch_sharding`."""
    n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by data*fsdp = {n}")
    idx = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = [s[0].start or 0 for s in idx.values()]
    stops = [global_batch if s[0].stop is None else s[0].stop for s in idx.values()]
    start, stop = min(starts), max(stops)
    if stop - start != len({(a, b) for a, b in zip(starts, stops)}) * (global_batch // n):
        raise ValueError("this process's batch rows are not contiguous; use a mesh whose batch axes "
                         "follow the process order (jax.make_mesh does)")
    return start, stop


def make_global_batch(mesh: Mesh, local: Mapping[str, np.ndarray], global_batch: int) -> dict[str, jax.Array]:
    """Global arrays (batch-sharded) from this host's rows (see :func:`local_batch_rows`)."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
    return out
