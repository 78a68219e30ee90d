"""Meshes and regex partition rules for parameters.

A mesh is declared in the config as ordered axes, e.g.
    mesh = {"data": 1, "fsdp": -1, "model": 1}      # -1 takes the rest
and each model's parameters are partitioned by regex rules over their
'/'-joined paths. A rule's spec names one entry per array dimension:
  "model" / "fsdp" / "data"  shard that dimension over the mesh axis (or a
                             tuple of axes);
  None                       leave it unsharded (free for automatic FSDP);
  "layers"                   the stacked-layer axis of scanned parameters,
                             never sharded (each scan step reads one layer).
After a rule matches, two adjustments keep one rule set valid for every model
size and mesh: an axis that does not divide its dimension is dropped (e.g. 1
key/value head over model=2), and if the mesh has an "fsdp" axis that the spec
does not use, it is placed on the largest free dimension it divides (arrays
under `fsdp_min_size` elements stay replicated).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# The default partition rules of parameters: regex over the '/'-joined
# parameter path -> one mesh-axis entry per dimension. Tensor parallelism over
# attention heads and MLP hidden units, vocabulary rows over the model axis;
# automatic FSDP everywhere else. (Activations: models/logical.ACTIVATION_RULES.)
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    (r"(^|/)attn/q_einsum/w$", ("layers", "model", None, None)),          # [L,N,D,H]
    (r"(^|/)attn/kv_einsum/w$", ("layers", None, "model", None, None)),   # [L,2,K,D,H]
    (r"(^|/)attn/attn_vec_einsum/w$", ("layers", "model", None, None)),   # [L,N,H,D]
    (r"(^|/)mlp/gating_einsum$", ("layers", None, None, "model")),        # [L,2,D,F]
    (r"(^|/)mlp/linear$", ("layers", "model", None)),                     # [L,F,D]
    (r"(^|/)embedder/input_embedding$", (("model", "fsdp"), None)),       # [V,D]
    (r"MultiHeadDotProductAttention_0/(query|key|value)/kernel$",
     ("layers", None, "model", None)),                                    # [L,D,h,hd]
    (r"MultiHeadDotProductAttention_0/(query|key|value)/bias$", ("layers", "model", None)),
    (r"MultiHeadDotProductAttention_0/out/kernel$", ("layers", "model", None, None)),
    (r"MlpBlock_0/Dense_0/kernel$", ("layers", None, "model")),
    (r"MlpBlock_0/Dense_0/bias$", ("layers", "model")),
    (r"MlpBlock_0/Dense_1/kernel$", ("layers", "model", None)),
    (r"(^|/)(layers|encoderblock)/", ("layers",)),
    (r".*", ()),
)
FSDP_MIN_SIZE = 1 << 14


def resolve_axes(axes: Mapping[str, int] | Sequence[tuple[str, int]], n_devices: int
                 ) -> dict[str, int]:
  """Fills the one -1 axis so that the product equals n_devices."""
  items = list(axes.items()) if isinstance(axes, Mapping) else list(axes)
  if not items:
    raise ValueError("a mesh needs at least one axis")
  names = [n for n, _ in items]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axis names repeat: {names}")
  sizes = [int(s) for _, s in items]
  if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive with at most one -1: {dict(items)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f"mesh {dict(items)} cannot fill {n_devices} devices")
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise ValueError(f"mesh {dict(zip(names, sizes))} has {int(np.prod(sizes))} "
                     f"devices but {n_devices} are available")
  return dict(zip(names, sizes))


def make_mesh(axes: Mapping[str, int] | Sequence[tuple[str, int]] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over `devices` (default: all), axes given as {name: size}."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_axes(axes or {"data": 1, "fsdp": -1, "model": 1}, len(devices))
  return jax.make_mesh(tuple(sizes.values()), tuple(sizes.keys()),
                       axis_types=(AxisType.Auto,) * len(sizes), devices=devices)


def _axes_size(mesh_shape: Mapping[str, int], axes) -> int:
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([mesh_shape.get(a, 1) for a in axes]))


def spec_for_param(path: str, shape: Sequence[int], mesh_shape: Mapping[str, int],
                   rules=PARAM_RULES, fsdp_min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
  """The PartitionSpec of one parameter (works on a mesh shape alone, so the
  memory planner can evaluate slices it does not have)."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      break
  else:
    raise ValueError(f"no partition rule matches parameter {path!r}")
  spec = list(spec) + [None] * (len(shape) - len(spec))
  if len(spec) > len(shape):
    raise ValueError(f"partition rule {pattern!r} has {len(spec)} entries but "
                     f"{path!r} has shape {tuple(shape)}")
  out, used = [], set()
  for dim, entry in zip(shape, spec):
    if entry in (None, "layers"):
      out.append(entry)
      continue
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in axes if mesh_shape.get(a, 1) > 1 and a not in used)
    if axes and dim % _axes_size(mesh_shape, axes) == 0:
      out.append(axes if len(axes) > 1 else axes[0])
      used.update(axes)
    else:
      out.append(None)
  fsdp = mesh_shape.get("fsdp", 1)
  if fsdp > 1 and "fsdp" not in used and int(np.prod(shape)) >= fsdp_min_size:
    free = [i for i, e in enumerate(out) if e is None and shape[i] % fsdp == 0]
    if free:
      best = max(free, key=lambda i: shape[i])
      out[best] = "fsdp"
  return PartitionSpec(*[None if e == "layers" else e for e in out])


def param_specs(abstract_params, mesh_shape: Mapping[str, int], rules=PARAM_RULES,
                fsdp_min_size: int = FSDP_MIN_SIZE):
  flat = flax.traverse_util.flatten_dict(abstract_params, sep="/")
  specs = {k: spec_for_param(k, v.shape, mesh_shape, rules, fsdp_min_size)
           for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(specs, sep="/")


def param_shardings(abstract_params, mesh: Mesh, rules=PARAM_RULES,
                    fsdp_min_size: int = FSDP_MIN_SIZE):
  specs = param_specs(abstract_params, dict(mesh.shape), rules, fsdp_min_size)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def rules_from_config(rules) -> tuple[tuple[str, tuple], ...]:
  """Config rules ([[regex, [axis|None|[axes]...]], ...]) -> validated tuples."""
  if rules is None or len(rules) == 0:
    return PARAM_RULES
  out = []
  for i, rule in enumerate(rules):
    if not isinstance(rule, (list, tuple)) or len(rule) != 2:
      raise ValueError(f"partition rule {i} must be (regex, spec), got {rule!r}")
    pattern, spec = rule
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"partition rule {i}: bad regex {pattern!r}: {e}") from e
    spec = tuple(tuple(e) if isinstance(e, (list, tuple)) else e for e in (spec or ()))
    out.append((pattern, spec))
  if out[-1][0] not in (".*", r".*"):
    out.append((r".*", ()))
  return tuple(out)


def batch_spec(batch: int, mesh: Mesh, ndim: int) -> PartitionSpec:
  """Shards a leading batch dimension over data x fsdp when it divides."""
  axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
  if axes and batch % _axes_size(dict(mesh.shape), axes) == 0:
    return PartitionSpec(axes if len(axes) > 1 else axes[0], *([None] * (ndim - 1)))
  return PartitionSpec(*([None] * ndim))


def bytes_per_device(shape: Sequence[int], dtype, spec: PartitionSpec,
                     mesh_shape: Mapping[str, int]) -> int:
  n = int(np.prod(shape)) * np.dtype(dtype).itemsize
  for entry in spec:
    if entry is not None:
      n //= _axes_size(mesh_shape, entry)
  return n


# -- several JAX processes (multi-host) ---------------------------------------------

def is_primary() -> bool:
  """Process 0: the one that writes logs, metrics and reports."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits for every process to get here (no-op on one process): after
  process 0 writes files that the others read next."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def put_batch(batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]
              ) -> dict[str, jax.Array]:
  """Host rows -> global arrays placed by `shardings`. One process: its rows
  are the batch. Several: every process passes its own rows (its share, in
  process order) and the global batch is their concatenation, so the global
  row count is process_count times the local one."""
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), dict(shardings))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  out = {}
  for k, v in batch.items():
    s, v = shardings[k], np.asarray(v)
    spec = tuple(s.spec)
    if not spec or spec[0] is None:
      # Rows not split over the devices (a batch the mesh does not divide):
      # every device holds all rows, so every process needs all of them.
      full = np.asarray(multihost_utils.process_allgather(v, tiled=True))
      out[k] = jax.make_array_from_callback(full.shape, s, lambda idx, full=full: full[idx])
    else:
      out[k] = jax.make_array_from_process_local_data(s, v)
  return out


def to_host(tree):
  """numpy copies of a tree of arrays, gathering the ones sharded over
  several processes (a collective: every process must call it)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def local_rows(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's share of a global host batch that every process holds
  whole (rows [p * n, (p + 1) * n) of process p), for `put_batch`."""
  count, p = jax.process_count(), jax.process_index()
  if count == 1:
    return dict(batch)
  rows = len(next(iter(batch.values())))
  if rows % count:
    raise ValueError(f"a global batch of {rows} rows does not split over {count} processes")
  n = rows // count
  return {k: np.asarray(v)[p * n:(p + 1) * n] for k, v in batch.items()}
