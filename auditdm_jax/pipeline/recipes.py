"""One translator from a config section's optimizer knobs to `TrainConfig`.

Every training run of the pipeline (the pretrain recipes, the audit's GRPO
`audit.optim`, rectify) spells its optimizer the same way and gets the same
defaults (`OPTIM_DEFAULTS`: TrainConfig's own, with the pipeline's few
departures); a section sets only what differs.

  lr            peak learning rate (required)
  warmup        int: steps; float in [0, 1]: fraction of the steps
  end_lr        learning rate reached at the last step
  weight_decay, b2, grad_clip, grad_accum
  frozen        regexes of parameters that do not train
  checkpoint_every, log_every     (SFT runs; the audit has its own cadence)
  compiler_options, phrase_aux    (SFT runs)
  eval_every    SFT runs with an evaluation (pretrain's learning curves): every
                that many steps, 0 = at the end only
  loss_slots    the vocabulary projection only at each row's <= this many loss
                tokens (0: every position; TrainConfig.loss_slots); the audit's
                GRPO defaults it to audit.max_new_tokens (its completions)
"""

from __future__ import annotations

from collections.abc import Mapping

from auditdm_jax.audit import grpo
from auditdm_jax.audit import reward as reward_lib
from auditdm_jax.scenes.world import GRID
from auditdm_jax.train.config import TrainConfig


def _own(field: str):
  """TrainConfig's own default of `field`: the one home of the optimizer defaults."""
  return TrainConfig.__dataclass_fields__[field].default


# TrainConfig's defaults, except where every pipeline run departs from them on
# purpose (warm-up, b2, the SFT runs' cadence); a section (rectify.DEFAULTS)
# states only its own departures.
OPTIM_DEFAULTS = dict(warmup=0.05, end_lr=_own("end_lr"), weight_decay=_own("weight_decay"),
                      b2=0.99, grad_clip=_own("grad_clip"), grad_accum=_own("grad_accum"),
                      frozen=_own("frozen"), checkpoint_every=200, log_every=100,
                      compiler_options={}, phrase_aux=_own("phrase_aux"),
                      eval_every=_own("eval_every"), loss_slots=_own("loss_slots"))
OPTIM_KEYS = ("lr", "steps", "batch", "seq_len", *OPTIM_DEFAULTS)


def train_config(section: Mapping, *, steps: int, seed: int, mesh=None,
                 **fixed) -> TrainConfig:
  """TrainConfig from one section's knobs (a dict or ConfigDict), `steps`
  optimizer steps; `fixed` sets TrainConfig fields the caller decides."""
  s = dict(OPTIM_DEFAULTS, **dict(section))
  if "lr" not in s:
    raise ValueError(f"an optimizer section needs `lr`; got keys {sorted(dict(section))}")
  kw = dict(
      steps=int(steps), lr=float(s["lr"]), warmup_steps=s["warmup"],
      end_lr=float(s["end_lr"]), weight_decay=float(s["weight_decay"]), b2=float(s["b2"]),
      grad_clip=float(s["grad_clip"]), grad_accum=int(s["grad_accum"]),
      frozen=tuple(s["frozen"]), checkpoint_every=int(s["checkpoint_every"]),
      log_every=int(s["log_every"]), seed=int(seed), tensorboard=True, progress=False,
      compiler_options=tuple(dict(s["compiler_options"]).items()),
      phrase_aux=float(s["phrase_aux"]), phrase_classes=GRID,
      eval_every=int(s["eval_every"]), loss_slots=int(s["loss_slots"]))
  if mesh is not None:
    kw["mesh"] = dict(mesh)
  kw.update(fixed)
  return TrainConfig(**kw)


def recipe_config(rc, seed: int, steps_key: str = "steps") -> TrainConfig:
  """TrainConfig of one SFT recipe (pretrain's base / finetune / auditor, rectify)."""
  return train_config(rc, steps=int(rc[steps_key]), seed=seed)


def audit_configs(config) -> tuple[TrainConfig, grpo.GRPOConfig, reward_lib.RewardConfig]:
  """The audit section as (TrainConfig of the GRPO updates, GRPOConfig,
  RewardConfig); the GRPO run takes updates_per_batch updates per step."""
  a = config.audit
  steps = int(a.steps) * int(a.grpo.get("updates_per_batch", 1))
  # The vocabulary is projected only at the completion tokens (<= max_new_tokens
  # a row) unless audit.optim sets loss_slots (0: every position).
  slots = a.optim.get("loss_slots", int(a.max_new_tokens))
  tcfg = train_config(a.optim, steps=steps, seed=int(config.seed), loss_slots=int(slots))
  return tcfg, grpo.GRPOConfig(**dict(a.grpo)), reward_lib.RewardConfig(**dict(a.reward))
