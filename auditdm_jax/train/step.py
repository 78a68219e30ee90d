"""The jitted training step: microbatches under `lax.scan`, the frozen/trainable
split, the guarded optimizer update (a non-finite step applies nothing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from auditdm_jax.models import logical
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.train.config import TrainConfig
from auditdm_jax.train.loss import batch_sums, loss_mask, phrase_sums


def split_microbatches(x, n: int):
  """[B, ...] -> [n, B/n, ...]; microbatch a holds rows a, a+n, a+2n, ... so
  that with the batch sharded in contiguous blocks each device keeps its own
  rows (no data movement)."""
  b = x.shape[0]
  return x.reshape((b // n, n) + x.shape[1:]).swapaxes(0, 1)


class StepParts(NamedTuple):
  """What every jitted training step (SFT, GRPO) builds the same way."""
  split: Callable      # params -> (trainable {path: leaf}, frozen {path: leaf})
  merge: Callable      # (trainable, frozen) -> params tree
  act_rules: dict | None
  param_sh: dict       # {path: NamedSharding} of the params
  micro_sh: dict       # batch key -> sharding of its [A, B/A, ...] microbatches


def step_parts(tcfg: TrainConfig, mask, mesh: Mesh, state_shardings, batch_shardings
               ) -> StepParts:
  mask_flat = flax.traverse_util.flatten_dict(mask, sep="/")

  def split(params):
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return ({k: v for k, v in flat.items() if mask_flat[k]},
            {k: v for k, v in flat.items() if not mask_flat[k]})

  def merge(train_p, frozen_p):
    return flax.traverse_util.unflatten_dict({**train_p, **frozen_p}, sep="/")

  return StepParts(
      split, merge, None if tcfg.activation_rules is None else dict(tcfg.activation_rules),
      flax.traverse_util.flatten_dict(state_shardings["params"], sep="/"),
      {k: NamedSharding(mesh, PartitionSpec(None, *s.spec)) for k, s in batch_shardings.items()})


def guarded_update(tx, parts: StepParts, state, g, train_p, frozen_p, loss):
  """Applies gradients g {path: leaf} of the trainable params unless the loss
  or the gradient norm is non-finite (then params and optimizer state stay).
  Returns (new state, grad_norm, finite)."""
  grad_norm = optax.global_norm(g)
  grads = parts.merge(g, {k: jnp.zeros_like(v) for k, v in frozen_p.items()})
  updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
  upd_flat = flax.traverse_util.flatten_dict(updates, sep="/")
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jnp.where(finite, new, old)
  new_train = {k: keep(optax.apply_updates(p, upd_flat[k]), p) for k, p in train_p.items()}
  new_state = {"params": parts.merge(new_train, frozen_p),
               "opt_state": jax.tree.map(keep, new_opt, state["opt_state"]),
               "rng": state["rng"], "step": state["step"] + 1}
  return new_state, grad_norm, finite


def make_train_step(cfg: VLMConfig, tcfg: TrainConfig, tx, mask, mesh: Mesh,
                    state_shardings, batch_shardings):
  """The jitted (state, batch) -> (state, metrics) step (state donated)."""
  accum = tcfg.grad_accum
  parts = step_parts(tcfg, mask, mesh, state_shardings, batch_shardings)
  split, merge = parts.split, parts.merge
  act_rules, param_sh, micro_sh = parts.act_rules, parts.param_sh, parts.micro_sh

  def step_fn(state, batch):
    with logical.activation_sharding(mesh, act_rules):
      params = state["params"]
      train_p, frozen_p = split(params)
      key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
      micro = {k: jax.lax.with_sharding_constraint(split_microbatches(v, accum), micro_sh[k])
               for k, v in batch.items()}                          # [A, B/A, ...]
      aux_w = float(tcfg.phrase_aux)
      if aux_w:
        # The grounding term is a mean over the whole batch's phrases; the sums
        # below are divided by its token count, so each microbatch's phrase CE
        # is scaled by tokens / phrases (both known from the batch up front).
        n_all = jnp.maximum(jnp.sum(loss_mask(batch)).astype(jnp.float32), 1.0)
        m_all = jnp.maximum(jnp.sum(batch["phrases"][..., 0] >= 0).astype(jnp.float32), 1.0)

      def sums(tp, mb, k):
        p = merge(tp, frozen_p)
        if aux_w:
          nll, correct, n, ce, _ = phrase_sums(cfg, p, mb, k)
          return nll + aux_w * ce * (n_all / m_all), (nll, correct, n, ce)
        nll, correct, n = batch_sums(cfg, p, mb, k)
        return nll, (nll, correct, n, jnp.zeros((), jnp.float32))

      grad_fn = jax.value_and_grad(sums, has_aux=True)

      def body(carry, xs):
        g_acc, obj_acc, nll_acc, c_acc, n_acc, ce_acc = carry
        mb, i = xs
        (obj, (nll, c, n, ce)), g = grad_fn(train_p, mb, jax.random.fold_in(key, i))
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, obj_acc + obj, nll_acc + nll, c_acc + c, n_acc + n, ce_acc + ce), None

      g0 = {k: jax.lax.with_sharding_constraint(jnp.zeros(v.shape, jnp.float32), param_sh[k])
            for k, v in train_p.items()}
      zero = jnp.zeros((), jnp.float32)
      (g, obj, nll, correct, n, ce), _ = jax.lax.scan(
          body, (g0, zero, zero, zero, zero, zero), (micro, jnp.arange(accum)))
      denom = jnp.maximum(n, 1.0)
      g = {k: (v / denom).astype(train_p[k].dtype) for k, v in g.items()}
      loss = nll / denom
      new_state, grad_norm, finite = guarded_update(tx, parts, state, g, train_p, frozen_p,
                                                    obj / denom)
      metrics = {"loss": loss, "accuracy": correct / denom, "answer_tokens": n,
                 "text_tokens": jnp.sum(batch["input_mask"]).astype(jnp.float32),
                 "grad_norm": grad_norm, "finite": finite}
      if aux_w:
        metrics["phrase_loss"] = ce / m_all
      return new_state, metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
