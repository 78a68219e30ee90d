"""Logical activation-sharding constraints for the model layer.

Models name the axes of their activations ("batch", "seq", "embed", "heads",
"kv_heads", "mlp", "vocab", ...). Outside a sharding context `constrain` is
the identity, so the models run unchanged on one device. Inside
`activation_sharding(mesh, rules)` it pins each named axis to the mesh axes
that `rules` maps it to, dropping any assignment whose mesh size does not
divide the dimension (e.g. 1 key/value head over a model axis of 2).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_CTX: contextvars.ContextVar = contextvars.ContextVar("auditdm_activation_sharding",
                                                      default=None)

# The default logical-axis rules of activations: logical axis name -> mesh
# axes. (Parameters: sharding.PARAM_RULES.)
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "heads": ("model",),
    "kv_heads": ("model",),
    "mlp": ("model",),
    "vocab": ("model",),
}


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, Sequence[str] | str | None] | None = None):
  token = _CTX.set((mesh, dict(ACTIVATION_RULES if rules is None else rules)))
  try:
    yield
  finally:
    _CTX.reset(token)


def spec_for(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh,
             rules: Mapping) -> PartitionSpec:
  spec, used = [], set()
  for dim, name in zip(shape, names):
    axes = rules.get(name) if name else None
    if isinstance(axes, str):
      axes = (axes,)
    axes = tuple(a for a in (axes or ()) if a in mesh.shape and mesh.shape[a] > 1
                 and a not in used)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if axes and dim % size == 0:
      spec.append(axes if len(axes) > 1 else axes[0])
      used.update(axes)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def constrain(x, *names: str | None):
  ctx = _CTX.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} axis names for a {x.ndim}-d array")
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, spec_for(x.shape, names, mesh, rules)))
