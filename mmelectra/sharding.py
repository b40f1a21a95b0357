"""Device mesh, logical axis rules and the shardings of state and batch.

Parameters carry logical axis names (see `model.py`); `config.logical_axis_rules` maps
them onto the `(data, fsdp, model)` mesh, so changing the parallelism is a config edit.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmelectra import errors

MESH_AXES = ("data", "fsdp", "model")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Axis sizes with one `-1` filled from the device count; errors name the problem."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise errors.InvalidInput(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise errors.InvalidInput(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
                                f"divisible by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise errors.InvalidInput(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                              f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config.mesh, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def axis_rules(config) -> tuple:
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax)
               for name, ax in config.logical_axis_rules)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """`spec` with the mesh axes removed from every dimension they do not divide.

  The rules name axes, not sizes: 12 heads on `model=8`, a generator with 1 head, or a
  5-class head would be an indivisible sharding (an error at jit). Such a dimension
  drops axes from the minor end until the rest divides it, down to replication.
  """
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned`.

  Dimensions an axis does not divide are replicated along it (`fit_spec`).
  """
  specs = nn.get_partition_spec(abstract_boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.LogicallyPartitioned) else x,
      abstract_boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return jax.tree.map(lambda x, s: NamedSharding(mesh, fit_spec(s.spec, x.shape, mesh)),
                      shapes, shardings)
