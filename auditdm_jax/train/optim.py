"""The fine-tuning optimizer: AdamW with linear warm-up and cosine (or linear /
constant) decay, global-norm clipping, and frozen parameters.

Parameters are selected by regexes over their '/'-joined paths
(e.g. `img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel`):

  frozen    matching parameters get zero updates and no optimizer state at
            all (`optax.multi_transform` with `set_to_zero`; AdamW runs under
            `optax.masked`, whose moments hold `MaskedNode`s there);
  no_decay  matching trainable parameters are exempt from weight decay.

Clipping and the reported gradient norm cover the trainable parameters only.
Optimizer-state leaves that mirror a parameter (Adam's mu / nu) take that
parameter's sharding; everything else (step counts) is replicated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import flax
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

TRAIN, FROZEN = "train", "frozen"


def path_str(path) -> str:
  """'/'-joined dict keys of a pytree key path (other entries skipped)."""
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _matches(patterns: Sequence[str], path: str) -> bool:
  return any(re.search(p, path) for p in patterns)


def trainable_mask(params, frozen: Sequence[str]):
  """Tree of bools (True: trained) over `params`; raises when a pattern
  matches nothing (a typo would silently train the tower it meant to freeze)
  or when everything is frozen."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  for p in frozen:
    if not any(re.search(p, k) for k in flat):
      raise ValueError(f"TrainConfig.frozen pattern {p!r} matches no parameter; "
                       f"parameter paths look like {sorted(flat)[:3]}")
  mask = {k: not _matches(frozen, k) for k in flat}
  if not any(mask.values()):
    raise ValueError(f"TrainConfig.frozen {tuple(frozen)} freezes every parameter")
  return flax.traverse_util.unflatten_dict(mask, sep="/")


def lr_schedule(tcfg) -> optax.Schedule:
  """Linear warm-up from 0 to tcfg.lr, then decay to tcfg.end_lr at tcfg.steps."""
  warm = tcfg.warmup
  rest = max(tcfg.steps - warm, 1)
  if tcfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(tcfg.lr, rest, alpha=tcfg.end_lr / tcfg.lr)
  elif tcfg.schedule == "linear":
    decay = optax.linear_schedule(tcfg.lr, tcfg.end_lr, rest)
  else:
    decay = optax.constant_schedule(tcfg.lr)
  if warm == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, tcfg.lr, warm), decay], [warm])


def make_optimizer(tcfg, params) -> tuple[optax.GradientTransformation, dict, optax.Schedule]:
  """(tx, trainable mask tree, lr schedule) for `params` (arrays or
  ShapeDtypeStructs)."""
  mask = trainable_mask(params, tcfg.frozen)
  labels = jax.tree.map(lambda t: TRAIN if t else FROZEN, mask)
  schedule = lr_schedule(tcfg)

  def decay_mask(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not _matches(tcfg.no_decay, path_str(path)), tree)

  train_tx = optax.chain(
      optax.clip_by_global_norm(tcfg.grad_clip) if tcfg.grad_clip else optax.identity(),
      optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                  weight_decay=tcfg.weight_decay, mask=decay_mask if tcfg.no_decay else None))
  tx = optax.multi_transform({TRAIN: train_tx, FROZEN: optax.set_to_zero()}, labels)
  return tx, mask, schedule


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
  """Shardings for an optimizer state: a leaf whose key path ends in a
  parameter's path (and has its shape) takes that parameter's sharding."""
  flat = flax.traverse_util.flatten_dict(param_shardings, sep="/")
  shapes = {k: tuple(v.shape) for k, v in
            flax.traverse_util.flatten_dict(abstract_params, sep="/").items()}
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    dict_tail = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      dict_tail.append(str(k.key))
    name = "/".join(reversed(dict_tail))
    if name in flat and shapes[name] == tuple(leaf.shape):
      return flat[name]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)
