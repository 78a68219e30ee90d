"""`TrainConfig`: optimisation, checkpointing and logging of one fine-tuning run,
validated on construction (every problem named at once)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from auditdm_jax import sharding


SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_MESH = (("data", 1), ("fsdp", -1), ("model", 1))

def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _regexes(name: str, value, problems: list[str]) -> tuple[str, ...]:
  if isinstance(value, str):
    problems.append(f"{name} must be a tuple of regexes, got the string {value!r} "
                    f"(write ({value!r},))")
    return (value,)
  out = tuple(value)
  for p in out:
    try:
      re.compile(p)
    except (re.error, TypeError) as e:
      problems.append(f"{name}: bad regex {p!r}: {e}")
  return out


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, checkpointing and logging of one fine-tuning run."""

  steps: int = 1000                   # optimizer steps (one data batch each)
  lr: float = 1e-5                    # peak learning rate
  warmup_steps: int | float = 0       # int: steps; float in [0, 1]: fraction of steps
  end_lr: float = 0.0                 # learning rate reached at `steps`
  schedule: str = "cosine"            # decay after warm-up: cosine | linear | constant
  weight_decay: float = 0.0           # decoupled (AdamW), multiplied by the lr
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float | None = 1.0       # global-norm clip; None or 0: off
  grad_accum: int = 1                 # microbatches per step (must divide the batch)
  frozen: tuple[str, ...] = ()        # regexes over '/'-joined param paths, e.g. r"^img/"
  no_decay: tuple[str, ...] = ()      # regexes of params without weight decay
  checkpoint_every: int = 500
  keep_checkpoints: int | None = 2    # None: keep all
  log_every: int = 10
  eval_every: int = 0                 # 0: evaluate (if eval_fn) at the end only
  seed: int = 0
  mesh: tuple[tuple[str, int], ...] = DEFAULT_MESH   # or a {name: size} dict
  rules: tuple | None = None          # partition rules; None: sharding.PARAM_RULES
  activation_rules: tuple | None = None   # logical activation rules; None: defaults
  fsdp_min_size: int = sharding.FSDP_MIN_SIZE
  compiler_options: tuple = ()        # XLA options for the step, {name: value} or pairs
  progress: bool | None = None        # tqdm bar; None: when stdout is a tty
  tensorboard: bool = True
  export_final: bool = False          # also save the final model to workdir/final
  phrase_aux: float = 0.0             # weight of the phrase grounding loss (0: off)
  phrase_classes: int = 3             # classes of its row and column heads
  loss_slots: int = 0                 # > 0: logits only at the <= this many loss tokens
                                      # of each row (the vocabulary projection skips
                                      # the prompt); 0: at every position

  def __post_init__(self):
    problems = self._optimizer_problems() + self._count_problems()
    self._normalise(problems)
    problems += self._aux_problems()
    if problems:
      raise ValueError("invalid TrainConfig: " + "; ".join(problems))

  def _optimizer_problems(self) -> list[str]:
    """The schedule and the optimizer's numbers."""
    problems: list[str] = []
    if not _is_int(self.steps) or self.steps < 1:
      problems.append(f"steps must be an int >= 1, got {self.steps!r}")
    for name in ("lr",):
      v = getattr(self, name)
      if not _is_num(v) or not math.isfinite(v) or v <= 0:
        problems.append(f"{name} must be a finite number > 0, got {v!r}")
    if not _is_num(self.end_lr) or not math.isfinite(self.end_lr) or self.end_lr < 0:
      problems.append(f"end_lr must be a finite number >= 0, got {self.end_lr!r}")
    elif _is_num(self.lr) and self.end_lr > self.lr:
      problems.append(f"end_lr ({self.end_lr}) must not exceed lr ({self.lr})")
    w = self.warmup_steps
    if _is_int(w):
      if w < 0 or (_is_int(self.steps) and w > self.steps):
        problems.append(f"warmup_steps must be in [0, steps={self.steps}], got {w!r}")
    elif isinstance(w, (float, np.floating)):
      if not 0.0 <= w <= 1.0:
        problems.append(f"warmup_steps as a float is a fraction of steps and must be "
                        f"in [0, 1], got {w!r}")
    else:
      problems.append(f"warmup_steps must be an int or a float fraction, got {w!r}")
    if self.schedule not in SCHEDULES:
      problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if not _is_num(self.weight_decay) or not self.weight_decay >= 0:
      problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
    for name in ("b1", "b2"):
      v = getattr(self, name)
      if not _is_num(v) or not 0.0 <= v < 1.0:
        problems.append(f"{name} must be in [0, 1), got {v!r}")
    if not _is_num(self.eps) or not self.eps > 0:
      problems.append(f"eps must be > 0, got {self.eps!r}")
    if self.grad_clip is not None and (not _is_num(self.grad_clip)
                                       or not self.grad_clip >= 0):
      problems.append(f"grad_clip must be None or a number >= 0, got {self.grad_clip!r}")
    return problems

  def _count_problems(self) -> list[str]:
    """Step counts, intervals, seeds and sizes."""
    problems: list[str] = []
    for name in ("grad_accum", "checkpoint_every", "log_every"):
      v = getattr(self, name)
      if not _is_int(v) or v < 1:
        problems.append(f"{name} must be an int >= 1, got {v!r}")
    if not _is_int(self.loss_slots) or self.loss_slots < 0:
      problems.append(f"loss_slots must be an int >= 0, got {self.loss_slots!r}")
    if not _is_int(self.eval_every) or self.eval_every < 0:
      problems.append(f"eval_every must be an int >= 0, got {self.eval_every!r}")
    if self.keep_checkpoints is not None and (not _is_int(self.keep_checkpoints)
                                              or self.keep_checkpoints < 1):
      problems.append(f"keep_checkpoints must be None or an int >= 1, "
                      f"got {self.keep_checkpoints!r}")
    if not _is_int(self.seed):
      problems.append(f"seed must be an int, got {self.seed!r}")
    if not _is_int(self.fsdp_min_size) or self.fsdp_min_size < 0:
      problems.append(f"fsdp_min_size must be an int >= 0, got {self.fsdp_min_size!r}")
    return problems

  def _normalise(self, problems: list[str]) -> None:
    """Compiler options, regexes, mesh and rules into their canonical form (in
    place); their problems appended to `problems`."""
    set_ = lambda k, v: object.__setattr__(self, k, v)
    opts = self.compiler_options
    opts = list(opts.items()) if isinstance(opts, Mapping) else list(opts or ())
    if any(not isinstance(o, (tuple, list)) or len(o) != 2 or not isinstance(o[0], str)
           or not isinstance(o[1], (bool, int, float, str)) for o in opts):
      problems.append(f"compiler_options must map option names to bool/int/float/str "
                      f"values, got {self.compiler_options!r}")
    else:
      set_("compiler_options", tuple(sorted((k, v) for k, v in opts)))
    set_("frozen", _regexes("frozen", self.frozen, problems))
    set_("no_decay", _regexes("no_decay", self.no_decay, problems))
    mesh = self.mesh
    items = list(mesh.items()) if isinstance(mesh, Mapping) else list(mesh or ())
    if (not items or any(not isinstance(i, (tuple, list)) or len(i) != 2 for i in items)
        or any(not isinstance(n, str) or not _is_int(s) or (s < 1 and s != -1)
               for n, s in items)):
      problems.append(f"mesh must map axis names to sizes >= 1 (one may be -1), "
                      f"got {mesh!r}")
    else:
      names = [n for n, _ in items]
      if len(set(names)) != len(names) or sum(s == -1 for _, s in items) > 1:
        problems.append(f"mesh axes must be unique with at most one -1, got {mesh!r}")
      set_("mesh", tuple((n, int(s)) for n, s in items))
    if self.rules is not None:
      try:
        set_("rules", sharding.rules_from_config(self.rules))
      except ValueError as e:
        problems.append(f"rules: {e}")
    if self.activation_rules is not None:
      ar = self.activation_rules
      items = list(ar.items()) if isinstance(ar, Mapping) else list(ar)
      set_("activation_rules", tuple(
          (k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in items))

  def _aux_problems(self) -> list[str]:
    """The phrase loss and the progress bar."""
    problems: list[str] = []
    if not _is_num(self.phrase_aux) or not math.isfinite(self.phrase_aux) \
        or self.phrase_aux < 0:
      problems.append(f"phrase_aux must be a finite number >= 0, got {self.phrase_aux!r}")
    if not _is_int(self.phrase_classes) or self.phrase_classes < 2:
      problems.append(f"phrase_classes must be an int >= 2, got {self.phrase_classes!r}")
    if self.progress is not None and not isinstance(self.progress, bool):
      problems.append(f"progress must be None or a bool, got {self.progress!r}")
    return problems

  @property
  def warmup(self) -> int:
    """Warm-up length in steps."""
    if isinstance(self.warmup_steps, (float, np.floating)):
      return round(self.warmup_steps * self.steps)
    return int(self.warmup_steps)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
