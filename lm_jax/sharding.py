"""Device mesh, logical-axis rules and the one place PartitionSpecs are written.

Parameters and activations carry logical axis names (B batch, D embed, ...); `LOGICAL_RULES`
maps them to mesh axes. A mesh axis that does not divide a dimension is dropped for that
dimension (replicated) instead of failing, so small models run on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm_jax.errors import MeshError  # defined there, re-exported here

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axes (tuple = sharded over several axes, None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data:2,fsdp:2,tensor:2' -> {'data': 2, 'fsdp': 2, 'tensor': 2}; '' -> {}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = part.partition(":")
        if not sep or name not in MESH_AXES or not size.lstrip("-").isdigit():
            raise MeshError(
                f"malformed mesh entry {part!r} in {spec!r}: use 'axis:size' with axis in "
                f"{MESH_AXES}, e.g. --train.mesh=data:2,fsdp:2,tensor:2"
            )
        if int(size) <= 0 and int(size) != -1:
            raise MeshError(f"mesh axis {name!r} size must be > 0 (or -1 = the rest), got {size}")
        out[name] = int(size)
    return out


def make_mesh(spec: str | dict[str, int] = "", devices: Sequence | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor, expert); unspecified axes get 1, one -1 = the rest.

    The default ('' ) puts every device on `data`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    if not sizes:
        sizes = {"data": -1}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {free}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % known:
            raise MeshError(
                f"mesh {sizes} cannot use {len(devices)} devices: {known} does not divide it"
            )
        sizes[free[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise MeshError(
            f"mesh {sizes} needs {total} devices but {len(devices)} are visible; make the axis "
            f"sizes multiply to {len(devices)} (or use -1 for one axis), e.g. --train.mesh=data:-1"
        )
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _rule_axes(name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in LOGICAL_RULES:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule in lm_jax.sharding.LOGICAL_RULES")


def logical_to_spec(
    names: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """Logical names -> PartitionSpec, skipping size-1 axes, reused axes and non-divisors."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        dim = None if shape is None else shape[i]
        axes = []
        for ax in _rule_axes(name):
            size = mesh.shape[ax]
            if size == 1 or ax in used:
                continue
            cur = math.prod(mesh.shape[a] for a in axes) * size
            if dim is not None and dim % cur:
                continue
            axes.append(ax)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def named_sharding(names, mesh: Mesh, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, mesh, shape))


def _names_of(leaf) -> tuple | None:
    if isinstance(leaf, nn.Partitioned):
        return leaf.names
    return None


def params_shardings(abstract_boxed, mesh: Mesh):
    """Shardings for a tree of (possibly `nn.Partitioned`-boxed) abstract leaves.

    Leaves without logical names are replicated.
    """

    def one(leaf):
        names = _names_of(leaf)
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        if names is None:
            return NamedSharding(mesh, PartitionSpec())
        return named_sharding(names, mesh, value.shape)

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_names(abstract_boxed):
    """Tree of logical-name tuples (None for unnamed leaves), matching the unboxed tree."""
    return jax.tree.map(_names_of, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def check_batch_divides(batch_size: int, mesh: Mesh, flag: str) -> None:
    """A batch of `batch_size` rows must split evenly over the mesh's data axis (`flag` names
    the setting in the one-line error)."""
    data = mesh.shape.get("data", 1)
    if batch_size % data:
        raise MeshError(
            f"--{flag}={batch_size} is not a multiple of the mesh's data axis ({data}); pick a "
            "multiple"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_size: int | None = None) -> NamedSharding:
    """Shard the leading (batch) dimension over the data-parallel axes."""
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    return named_sharding(("batch",) + (None,) * (ndim - 1), mesh, shape)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation to logical names under `jax.set_mesh(mesh)`; no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh, x.shape))
