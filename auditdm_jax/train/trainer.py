"""`Trainer`: the sharded training state of one model and its compiled step
(cached per model, step-relevant config, mesh and batch signature)."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from auditdm_jax import sharding
from auditdm_jax.models import vlm
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.train import ckpt as ckpt_lib
from auditdm_jax.train.optim import make_optimizer, opt_state_shardings
from auditdm_jax.train.config import DEFAULT_MESH, TrainConfig
from auditdm_jax.train.batches import check_batch, loss_positions
from auditdm_jax.train.loss import PHRASE_HEADS, phrase_head_params
from auditdm_jax.train.step import make_train_step


# Compiled steps (and optimizer inits) by (model, HLO-relevant TrainConfig, mesh,
# batch signature): repeated `train` calls (rounds of fine-tuning, tests) reuse them.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_MAX = 16


def _cached(key, build: Callable[[], Any]):
  if key in _COMPILED:
    _COMPILED.move_to_end(key)
    return _COMPILED[key]
  _COMPILED[key] = build()
  while len(_COMPILED) > _COMPILED_MAX:
    _COMPILED.popitem(last=False)
  return _COMPILED[key]


def _step_key_config(tcfg: TrainConfig) -> TrainConfig:
  """tcfg with the fields that do not enter the compiled step normalised
  (rules None and the default rules are the same step)."""
  rules = sharding.PARAM_RULES if tcfg.rules is None else tcfg.rules
  return dataclasses.replace(tcfg, seed=0, checkpoint_every=1, keep_checkpoints=None,
                             log_every=1, eval_every=0, progress=None, tensorboard=False,
                             export_final=False, mesh=DEFAULT_MESH, rules=rules)


def _check_params(params, abstract) -> None:
  got = {k: tuple(np.shape(v)) for k, v in
         flax.traverse_util.flatten_dict(params, sep="/").items()}
  want = {k: tuple(v.shape) for k, v in
          flax.traverse_util.flatten_dict(abstract, sep="/").items()}
  if got != want:
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    shapes = [f"{k}: {got[k]} vs {want[k]}" for k in sorted(set(got) & set(want))
              if got[k] != want[k]][:5]
    raise ValueError(f"params do not fit the model config: missing {missing}, "
                     f"unexpected {extra}, shape mismatches {shapes}")


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


class Trainer:
  """The sharded training state of one model and its compiled step.

  state = {"params", "opt_state", "rng" (uint32 key data), "step" (int32)},
  every leaf placed by `state_shardings`.
  """

  def __init__(self, cfg: VLMConfig, tcfg: TrainConfig, mesh: Mesh | None = None):
    self.cfg, self.tcfg = cfg, tcfg
    self.mesh = mesh if mesh is not None else sharding.make_mesh(dict(tcfg.mesh))
    rules = tcfg.rules if tcfg.rules is not None else sharding.PARAM_RULES
    self.abstract_params = vlm.abstract_params(cfg)
    if tcfg.phrase_aux:
      self.abstract_params = dict(self.abstract_params, **{
          PHRASE_HEADS: phrase_head_params(cfg, tcfg.phrase_classes, abstract=True)})
    self.param_shardings = sharding.param_shardings(self.abstract_params, self.mesh, rules,
                                                    tcfg.fsdp_min_size)
    self.tx, self.mask, self.schedule = make_optimizer(tcfg, self.abstract_params)
    self.abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
    self.opt_shardings = opt_state_shardings(self.abstract_opt, self.abstract_params,
                                             self.param_shardings, self.mesh)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.state_shardings = {"params": self.param_shardings, "opt_state": self.opt_shardings,
                            "rng": self.replicated, "step": self.replicated}
    _, self.opt_paths = ckpt_lib.flatten_opt_state(self.abstract_opt)
    self.compile_s = 0.0

  def abstract_state(self) -> dict:
    """ShapeDtypeStructs (with shardings) of the state: Orbax restore targets."""
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return {"params": _with_shardings(self.abstract_params, self.param_shardings),
            "opt_state": _with_shardings(self.abstract_opt, self.opt_shardings),
            "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=self.replicated),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)}

  def init_state(self, params) -> dict:
    """Step-0 state from `params` (copied: the step donates its state); with
    phrase_aux, zero grounding heads are added unless params hold them."""
    if self.tcfg.phrase_aux and PHRASE_HEADS not in params:
      params = dict(params, **{PHRASE_HEADS: phrase_head_params(self.cfg,
                                                                 self.tcfg.phrase_classes)})
    _check_params(params, self.abstract_params)
    # Fresh copies: device_put may reuse the input's buffer for a shard even
    # with may_alias=False (seen on CPU: a device-0 array put replicated), and
    # the donated state must not share a buffer with any other array made from
    # the same params (e.g. the GRPO KL reference, which it would delete).
    params = jax.tree.map(
        lambda x, a, s: jax.device_put(
            jnp.array(x, dtype=a.dtype, copy=True) if isinstance(x, jax.Array)
            else np.array(x, a.dtype, copy=True), s, may_alias=False),
        params, self.abstract_params, self.param_shardings)
    key = ("init", self.cfg, _step_key_config(self.tcfg), self.mesh)
    opt_init = _cached(key, lambda: jax.jit(self.tx.init, out_shardings=self.opt_shardings)
                       .lower(params).compile(self._compiler_options()))
    opt_state = opt_init(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(self.tcfg.seed)), self.replicated)
    return {"params": params, "opt_state": opt_state, "rng": rng,
            "step": jax.device_put(jnp.int32(0), self.replicated)}

  def batch_shardings(self, batch: Mapping[str, np.ndarray]) -> dict[str, NamedSharding]:
    """Batch rows over data x fsdp when each microbatch divides evenly (`batch`
    is this process's share of the global batch)."""
    rows = next(iter(batch.values())).shape[0] * jax.process_count()   # global rows
    micro = rows // self.tcfg.grad_accum
    return {k: NamedSharding(self.mesh, sharding.batch_spec(micro, self.mesh, np.ndim(v)))
            for k, v in batch.items()}

  def _compiler_options(self) -> dict[str, Any] | None:
    return dict(self.tcfg.compiler_options) or None

  def compiled_step(self, state, dev_batch):
    """The step compiled for this batch signature (cached across Trainers)."""
    sig = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(dev_batch.items()))
    key = ("step", type(self).__name__, self.cfg, self.step_key(), self.mesh, sig)

    def build():
      t0 = time.perf_counter()
      batch_sh = {k: v.sharding for k, v in dev_batch.items()}
      fn = self.make_step(batch_sh)
      out = fn.lower(state, dev_batch).compile(self._compiler_options())
      self.compile_s += time.perf_counter() - t0
      return out

    return _cached(key, build)

  # Subclasses with another loss (the GRPO trainer) override these three.
  def step_key(self):
    """What, besides the model, mesh and batch signature, shapes the step."""
    return _step_key_config(self.tcfg)

  def make_step(self, batch_shardings):
    """The jitted (state, batch) -> (state, metrics) function."""
    return make_train_step(self.cfg, self.tcfg, self.tx, self.mask, self.mesh,
                           self.state_shardings, batch_shardings)

  def check(self, batch) -> dict[str, np.ndarray]:
    out = check_batch(self.cfg, batch, self.tcfg.grad_accum)
    if self.tcfg.loss_slots:
      out["loss_pos"] = loss_positions(out, self.tcfg.loss_slots)
    return out

  def step(self, state, batch) -> tuple[dict, dict[str, np.ndarray]]:
    """One optimizer step on a host batch; `state` is donated (invalid after).
    Returns the new state and the step's metrics (numpy scalars)."""
    batch = self.check(batch)
    if self.tcfg.phrase_aux and "phrases" not in batch:
      raise ValueError("TrainConfig.phrase_aux > 0 needs batch['phrases'] [B, P, 3] "
                       "(tasks.VQATask(..., phrases=True) makes them)")
    if not self.tcfg.phrase_aux:
      batch.pop("phrases", None)
    dev_batch = sharding.put_batch(batch, self.batch_shardings(batch))
    new_state, metrics = self.compiled_step(state, dev_batch)(state, dev_batch)
    return new_state, jax.device_get(metrics)
