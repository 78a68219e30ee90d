"""Where the models live: the config's one mesh and each model's partition rules.

  mesh                     {"data", "fsdp", "model"} sizes, one may be -1
                           (default data=1, fsdp=-1, model=1: FSDP over all devices)
  partition_rules          regex rules over '/'-joined parameter paths for every
                           model (empty: `sharding.PARAM_RULES`)
  models.<name>.partition_rules   that model's own rules (they win)

Every sampler and trainer a stage builds is placed by `mesh(config)` and
`rules(config, name)`: several models share the mesh, each with its rules. A
derived model (`<auditor>_trained`, `<target>_rectified`) takes the rules of
the model it was made from.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from auditdm_jax import sharding
from auditdm_jax.pipeline import layout
from auditdm_jax.sampling import Sampler

DEFAULT_MESH = {"data": 1, "fsdp": -1, "model": 1}


def mesh_axes(config) -> dict:
  return dict(config.get("mesh", None) or DEFAULT_MESH)


def mesh(config) -> Mesh:
  """The mesh every model of the run shares."""
  return sharding.make_mesh(mesh_axes(config))


def base_name(config, name: str) -> str:
  """The configured model a (possibly derived) model name comes from."""
  for suffix in (layout.TRAINED_SUFFIX, layout.RECTIFIED_SUFFIX):
    if name not in config.models and name.endswith(suffix):
      return base_name(config, name[:-len(suffix)])
  return name


def rules(config, name: str) -> tuple:
  """The partition rules of model `name`: its own, else the config's, else
  the defaults."""
  spec = config.models.get(base_name(config, name), {})
  own = spec.get("partition_rules", None) if spec else None
  return sharding.rules_from_config(own or config.get("partition_rules", None) or None)


def sampler(config, name: str, model, mesh_: Mesh | None = None, **kw) -> Sampler:
  """A Sampler of `model` (named `name` in the config) on the run's mesh."""
  return Sampler(model, mesh_ if mesh_ is not None else mesh(config), rules(config, name),
                 **kw)


def placed(tcfg, config, name: str):
  """`tcfg` (a TrainConfig) with the run's mesh and model `name`'s rules."""
  return dataclasses.replace(tcfg, mesh=mesh_axes(config), rules=rules(config, name))
