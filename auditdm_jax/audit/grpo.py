"""GRPO for the auditor: group-normalised advantages, a clipped importance
ratio, a k3 KL penalty to the frozen initial policy, token masks, loss
aggregation options and gradient accumulation, sharded on the mesh.

For a group of K completions of one prompt with rewards s_1..s_K:

  A_k = (s_k - mean_j s_j) / (std_j s_j + eps)          (`group_advantages`)

and for each completion token t (logs under the current policy pi, the
policy that sampled pi_old, the frozen initial policy pi_ref):

  ratio   = exp(log pi - log pi_old)
  surr    = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
  kl_k3   = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1
  l_t     = -(surr - beta * kl_k3)

aggregated over the batch (`LOSS_AGGREGATIONS`):
  token_mean           sum of l_t over all completion tokens / their count
  seq_mean_token_mean  mean over completions of (mean of l_t over its tokens)
                       (the original GRPO)
  seq_mean_token_sum   sum of l_t / (completions x max completion length)
                       (length-unbiased, "Dr. GRPO")

The per-token weights of the aggregation are computed once per batch, so a
batch split into `grad_accum` microbatches gives the same update as one.
With `updates_per_batch == 1` the sampling policy is the current one and
log pi_old = stop_gradient(log pi) (ratio 1, the clip inactive); otherwise
the caller passes pi_old's log-probabilities computed before the first update.

`GRPOTrainer` reuses the fine-tuning trainer's sharded state, optimizer,
checkpoint layout and compile cache; only the loss and the batch differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from auditdm_jax import sharding
from auditdm_jax.models import logical
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.train import batches as batches_lib
from auditdm_jax.train import loss as loss_lib
from auditdm_jax.train import step as step_lib
from auditdm_jax.train.config import TrainConfig
from auditdm_jax.train.trainer import Trainer

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
GRPO_KEYS = ("advantages", "old_logp", "ref_logp", "weights")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """The policy-gradient objective (the optimizer is a sft.TrainConfig)."""

  num_samples: int = 8                 # K: completions per prompt (one group)
  clip_eps: float = 0.2                # eps_low
  clip_eps_high: float | None = None   # None: = clip_eps
  kl_beta: float = 0.04
  adv_eps: float = 1e-4
  scale_rewards: bool = True           # False: A = s - mean (no std division)
  loss_agg: str = "token_mean"
  updates_per_batch: int = 1           # optimizer steps per sampled batch (mu)

  def __post_init__(self):
    problems = []
    if not isinstance(self.num_samples, int) or self.num_samples < 2:
      problems.append(f"num_samples must be an int >= 2 (a group), got {self.num_samples!r}")
    for name in ("clip_eps", "kl_beta", "adv_eps"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
        problems.append(f"{name} must be a finite number >= 0, got {v!r}")
    if self.clip_eps_high is not None and (not isinstance(self.clip_eps_high, (int, float))
                                           or not self.clip_eps_high >= 0):
      problems.append(f"clip_eps_high must be None or >= 0, got {self.clip_eps_high!r}")
    if self.loss_agg not in LOSS_AGGREGATIONS:
      problems.append(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
    if not isinstance(self.updates_per_batch, int) or self.updates_per_batch < 1:
      problems.append(f"updates_per_batch must be an int >= 1, got {self.updates_per_batch!r}")
    if problems:
      raise ValueError("invalid GRPOConfig: " + "; ".join(problems))

  @property
  def eps_high(self) -> float:
    return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


def group_advantages(rewards, num_samples: int, eps: float = 1e-4, scale: bool = True):
  """[G * K] rewards (group g = rows g*K .. g*K+K-1) -> [G * K] advantages.
  std is the population std of the group; a group of equal rewards gets 0."""
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim != 1 or r.shape[0] % num_samples:
    raise ValueError(f"rewards must be 1-D with a multiple of num_samples={num_samples} "
                     f"entries, got shape {r.shape}")
  g = r.reshape(-1, num_samples)
  adv = g - g.mean(axis=1, keepdims=True)
  if scale:
    adv = adv / (g.std(axis=1, keepdims=True) + eps)
  return adv.reshape(-1)


def aggregation_weights(mask, how: str):
  """float32 [N, T] weights w with loss = sum(w * l_t) for the aggregation."""
  m = jnp.asarray(mask, jnp.float32)
  n, t = m.shape
  if how == "token_mean":
    return m / jnp.maximum(m.sum(), 1.0)
  if how == "seq_mean_token_mean":
    return m / jnp.maximum(m.sum(axis=1, keepdims=True), 1.0) / n
  if how == "seq_mean_token_sum":
    return m / (n * t)
  raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {how!r}")


def token_objective(logp, old_logp, ref_logp, advantages, clip_low: float, clip_high: float,
                    beta: float):
  """(per-token loss l_t [N, T], kl_k3 [N, T], clipped bool [N, T])."""
  adv = advantages[:, None]
  ratio = jnp.exp(logp - old_logp)
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  surr = jnp.minimum(ratio * adv, clipped_ratio * adv)
  d = ref_logp - logp
  kl = jnp.exp(d) - d - 1.0
  clipped = (ratio * adv) > (clipped_ratio * adv)
  return -(surr - beta * kl), kl, clipped


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: GRPOConfig):
  """(scalar loss, metrics) for one batch; see the module doc."""
  mask = jnp.asarray(mask, jnp.bool_)
  w = aggregation_weights(mask, cfg.loss_agg)
  per_tok, kl, clipped = token_objective(logp, old_logp, ref_logp, advantages,
                                         cfg.clip_eps, cfg.eps_high, cfg.kl_beta)
  n = jnp.maximum(mask.sum(), 1)
  loss = jnp.sum(jnp.where(mask, w * per_tok, 0.0))
  return loss, {"kl": jnp.sum(jnp.where(mask, kl, 0.0)) / n,
                "clip_frac": jnp.sum(clipped & mask) / n}


def _logp_entropy(logits, target):
  lsm = jax.nn.log_softmax(logits, axis=-1)
  lp = jnp.take_along_axis(lsm, target[..., None], axis=-1)[..., 0]
  return lp, -jnp.sum(jnp.exp(lsm) * lsm, axis=-1)


def policy_stats(cfg: VLMConfig, params, batch):
  """(log pi(token) [B, T], entropy of pi at that position [B, T]).

  With batch["loss_pos"] (`TrainConfig.loss_slots`: the completion tokens'
  positions, `batches.loss_positions`) the vocabulary is projected only at
  those positions and both are 0 elsewhere; the loss reads them only there."""
  if "loss_pos" in batch:
    logits, target, _ = loss_lib.slot_logits(cfg, params, batch)
    lp, ent = _logp_entropy(logits, target)
    t = batch["tokens"].shape[1]
    return (loss_lib.scatter_slots(lp, batch["loss_pos"], t),
            loss_lib.scatter_slots(ent, batch["loss_pos"], t))
  pred, target = loss_lib.aligned_logits(cfg, params, batch)
  lp, ent = _logp_entropy(pred, target)
  return loss_lib.pad_to_tokens(cfg, lp), loss_lib.pad_to_tokens(cfg, ent)


def make_grpo_step(cfg: VLMConfig, tcfg: TrainConfig, gcfg: GRPOConfig, tx, mask, mesh,
                   state_shardings, batch_shardings):
  """The jitted (state, batch) -> (state, metrics) GRPO step (state donated).

  batch: the model inputs of `sft` (images, tokens, input_mask, mask_ar,
  loss_mask = completion tokens) plus advantages [N], old_logp [N, T],
  ref_logp [N, T] and weights [N, T] (`aggregation_weights` of the whole batch).
  """
  accum = tcfg.grad_accum
  parts = step_lib.step_parts(tcfg, mask, mesh, state_shardings, batch_shardings)
  split, merge = parts.split, parts.merge
  act_rules, param_sh, micro_sh = parts.act_rules, parts.param_sh, parts.micro_sh
  use_old = gcfg.updates_per_batch > 1

  def micro_loss(tp, frozen_p, mb):
    logp, ent = policy_stats(cfg, merge(tp, frozen_p), mb)
    old = mb["old_logp"] if use_old else jax.lax.stop_gradient(logp)
    per_tok, kl, clipped = token_objective(logp, old, mb["ref_logp"], mb["advantages"],
                                           gcfg.clip_eps, gcfg.eps_high, gcfg.kl_beta)
    m = loss_lib.loss_mask(mb)
    loss = jnp.sum(jnp.where(m, mb["weights"] * per_tok, 0.0))
    sums = {"kl": jnp.sum(jnp.where(m, kl, 0.0)), "entropy": jnp.sum(jnp.where(m, ent, 0.0)),
            "clipped": jnp.sum(clipped & m).astype(jnp.float32),
            "tokens": jnp.sum(m).astype(jnp.float32)}
    return loss, sums

  def step_fn(state, batch):
    with logical.activation_sharding(mesh, act_rules):
      params = state["params"]
      train_p, frozen_p = split(params)
      micro = {k: jax.lax.with_sharding_constraint(step_lib.split_microbatches(v, accum), micro_sh[k])
               for k, v in batch.items()}
      grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

      if accum == 1:        # one microbatch: no accumulation buffers, no loop
        (loss, s), g = grad_fn(train_p, frozen_p, jax.tree.map(lambda v: v[0], micro))
        return finish(state, train_p, frozen_p, g, loss, s)

      def body(carry, mb):
        g_acc, l_acc, s_acc = carry
        (loss, sums), g = grad_fn(train_p, frozen_p, mb)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        s_acc = jax.tree.map(jnp.add, s_acc, sums)
        return (g_acc, l_acc + loss, s_acc), None

      g0 = {k: jax.lax.with_sharding_constraint(jnp.zeros(v.shape, jnp.float32), param_sh[k])
            for k, v in train_p.items()}
      zero = jnp.zeros((), jnp.float32)
      s0 = {k: zero for k in ("kl", "entropy", "clipped", "tokens")}
      (g, loss, s), _ = jax.lax.scan(body, (g0, zero, s0), micro)
      return finish(state, train_p, frozen_p, g, loss, s)

  def finish(state, train_p, frozen_p, g, loss, s):
    g = {k: v.astype(train_p[k].dtype) for k, v in g.items()}
    new_state, grad_norm, finite = step_lib.guarded_update(tx, parts, state, g, train_p,
                                                      frozen_p, loss)
    n = jnp.maximum(s["tokens"], 1.0)
    metrics = {"loss": loss, "kl": s["kl"] / n, "entropy": s["entropy"] / n,
               "clip_frac": s["clipped"] / n, "completion_tokens": s["tokens"],
               "grad_norm": grad_norm, "finite": finite}
    return new_state, metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


class GRPOTrainer(Trainer):
  """train.Trainer with the GRPO objective; `logprobs` gives the per-token
  log-probabilities of a batch under any params (pi_old, pi_ref)."""

  def __init__(self, cfg: VLMConfig, tcfg: TrainConfig, gcfg: GRPOConfig, mesh=None):
    super().__init__(cfg, tcfg, mesh)
    self.gcfg = gcfg
    self._logprob_fns = {}

  def step_key(self):
    return (super().step_key(), self.gcfg)

  def make_step(self, batch_shardings):
    return make_grpo_step(self.cfg, self.tcfg, self.gcfg, self.tx, self.mask, self.mesh,
                          self.state_shardings, batch_shardings)

  def check(self, batch) -> dict[str, np.ndarray]:
    missing = [k for k in GRPO_KEYS + ("loss_mask",) if k not in batch]
    if missing:
      raise ValueError(f"GRPO batch lacks {missing}; use grpo_batch()")
    out = batches_lib.check_batch(self.cfg, batch, self.tcfg.grad_accum)
    b, t = out["tokens"].shape
    adv = np.asarray(batch["advantages"], np.float32)
    if adv.shape != (b,):
      raise ValueError(f"advantages have shape {adv.shape}, expected ({b},)")
    out["advantages"] = adv
    for k in ("old_logp", "ref_logp", "weights"):
      a = np.asarray(batch[k], np.float32)
      if a.shape != (b, t):
        raise ValueError(f"batch[{k!r}] has shape {a.shape}, tokens have {(b, t)}")
      out[k] = a
    bad = [k for k in GRPO_KEYS if not np.all(np.isfinite(out[k]))]
    if bad:
      raise ValueError(f"GRPO batch has non-finite values in {bad}")
    if self.tcfg.loss_slots:
      out["loss_pos"] = batches_lib.loss_positions(out, self.tcfg.loss_slots)
    return out

  def logprobs(self, params, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32 [B, T]: log p(token) under `params` (placed like the policy);
    with `TrainConfig.loss_slots`, at the loss tokens only (0 elsewhere)."""
    inputs = {k: np.asarray(batch[k]) for k in ("images", "tokens", "input_mask", "mask_ar")}
    if self.tcfg.loss_slots:
      inputs["loss_pos"] = batches_lib.loss_positions(batch, self.tcfg.loss_slots)
    sig = tuple((k, v.shape) for k, v in sorted(inputs.items()))
    if sig not in self._logprob_fns:
      sh = {k: NamedSharding(self.mesh, PartitionSpec()) for k in inputs}
      act_rules = (None if self.tcfg.activation_rules is None
                   else dict(self.tcfg.activation_rules))

      def fn(p, b):
        with logical.activation_sharding(self.mesh, act_rules):
          return policy_stats(self.cfg, p, b)[0]
      self._logprob_fns[sig] = jax.jit(fn, in_shardings=(self.param_shardings, sh))
    rep = NamedSharding(self.mesh, PartitionSpec())
    inputs = jax.device_put(inputs, {k: rep for k in inputs})
    return sharding.to_host(self._logprob_fns[sig](params, inputs))


def grpo_batch(cfg: VLMConfig, images, prompts: Sequence[Sequence[int]],
               completions: Sequence[Sequence[int]], advantages, seq_len: int,
               loss_agg: str) -> dict[str, np.ndarray]:
  """Model inputs of (image, prompt, completion) rows, with loss_mask over
  the completions, the advantages and the aggregation weights; old_logp and
  ref_logp are filled by the caller (zeros here)."""
  batch = batches_lib.sft_batch(cfg, images, prompts, completions, seq_len)
  batch["loss_mask"] = batch["mask_ar"].astype(bool) & batch["input_mask"]
  batch["advantages"] = np.asarray(advantages, np.float32)
  batch["weights"] = np.asarray(aggregation_weights(batch["loss_mask"], loss_agg))
  zeros = np.zeros(batch["tokens"].shape, np.float32)
  batch["old_logp"], batch["ref_logp"] = zeros, zeros.copy()
  return batch
