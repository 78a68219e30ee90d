"""The one training loop: resume, SIGTERM, the non-finite guard, checkpoint
cadence, metrics rows and the progress bar.

Supervised fine-tuning (`train/sft.train`) and the auditor's GRPO
(`audit/learner.GRPOLearner`) differ only in what one step does; both plug a
step function into `run`, as tunix's learners plug a loss into one trainer:

  step_fn(state, step) -> StepOut(state, metrics, row)

`step` counts loop steps from 0; `metrics` holds at least `finite`, `loss`
and `grad_norm` of the step's last update (numpy scalars); `row` is the
step's figures, written as a metrics row every `log_every` steps and at the
end. A loop step may take several optimizer updates (`updates_per_step`, the
GRPO updates per rollout batch): metrics rows and checkpoints are numbered by
optimizer update, so the state's own step counter names its checkpoint.

The loop runs inside `preemption.StopOnSignal()`: on SIGTERM it saves the
step it is at and raises `Preempted` (exit 143); the next start resumes
there (`resume`). A non-finite step raises `NonFiniteLossError` without
saving, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from auditdm_jax import sharding
from auditdm_jax.train import preemption
from auditdm_jax.train.metrics import MetricsWriter
from auditdm_jax.utils import chaos


class NonFiniteLossError(FloatingPointError):
  """A training step produced a non-finite loss or gradient norm."""


class StepOut(NamedTuple):
  state: Any
  metrics: Mapping[str, Any]
  row: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """What the loop needs besides the step.

  steps: loop steps in all (the run ends at `steps`, resumed or not).
  checkpoint_every / log_every: cadences in loop steps (the last step always
    saves and logs).
  updates_per_step: optimizer updates per loop step (rows and checkpoints are
    numbered by update).
  name: the progress bar's label and the prefix of the loop's errors and of its
    SIGTERM message ("at audit step 3 of 10"); "" for a plain training run
    ("at step 3 of 10", labelled "train").
  progress: a tqdm bar; None: when stdout is a terminal.
  tensorboard: metrics also as TensorBoard events.
  """
  steps: int
  checkpoint_every: int
  log_every: int
  updates_per_step: int = 1
  name: str = "train"
  progress: bool | None = None
  tensorboard: bool = True

  def __post_init__(self):
    for f in ("steps", "checkpoint_every", "log_every", "updates_per_step"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < (0 if f == "steps" else 1):
        raise ValueError(f"LoopConfig.{f} must be an integer >= "
                         f"{0 if f == 'steps' else 1}, got {v!r}")


def resume(checkpointer, trainer, init: Callable[[], Any]) -> tuple[Any, int | None]:
  """(state, latest): the state restored from the checkpointer's latest step,
  or `init()` when it holds none (latest None)."""
  latest = checkpointer.latest_step()
  if latest is None:
    return init(), None
  state, _ = checkpointer.restore(latest, trainer.abstract_state(), trainer.opt_paths)
  if int(state["step"]) != latest:
    raise ValueError(f"checkpoint {latest} in {checkpointer.directory} holds step "
                     f"{int(state['step'])}")
  return state, latest


def _progress_bar(cfg: LoopConfig, start: int):
  enabled = sys.stdout.isatty() if cfg.progress is None else cfg.progress
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=cfg.steps, initial=start, desc=cfg.name or "train", dynamic_ncols=True)


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
  """A metrics row as JSON values (numpy scalars as Python numbers, non-finite
  floats as None, as metrics.jsonl writes them)."""
  out = {}
  for k, v in row.items():
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float) and not math.isfinite(v):
      v = None
    if v is None or isinstance(v, (bool, int, float, str)):
      out[k] = v
  return out


class LoopResult(NamedTuple):
  state: Any
  step: int                    # loop steps done
  last: dict[str, Any]         # the last step's row (when no step ran: the row saved
                               # with the checkpoint resumed from, else {})
  last_saved: int | None       # the latest checkpoint's update number


def run(state, start: int, cfg: LoopConfig, step_fn: Callable[[Any, int], StepOut],
        checkpointer, workdir: str, meta: Mapping[str, Any], *,
        last_saved: int | None = None,
        extra_row: Callable[[Any, int], Mapping[str, Any]] | None = None,
        on_log: Callable[[int, dict], None] | None = None,
        postfix: Callable[[dict], Mapping[str, str]] | None = None) -> LoopResult:
  """Runs loop steps start .. cfg.steps - 1 from `state`.

  extra_row(state, step): figures merged into the row when it returns any
    (e.g. an evaluation due at this step; `step` counts done steps); the row
    is then written even off the log cadence.
  on_log(step, row): after a row is written (e.g. print examples).
  postfix(row): the progress bar's postfix.
  Checkpoints carry `meta` plus the update number and the last step's row
  (`last_row`), so a run resumed from its final checkpoint (killed after
  training, before its outputs were written) reports the same final figures
  as one that was not. The caller owns (and closes) the checkpointer; the
  loop closes the writer and bar it made.
  """
  mu = cfg.updates_per_step
  bar = _progress_bar(cfg, start)
  writer = MetricsWriter(workdir, start * mu, tensorboard=cfg.tensorboard,
                         write_fn=None if bar is None else bar.write,
                         enabled=sharding.is_primary())
  last: dict[str, Any] = {}
  if start >= cfg.steps and last_saved is not None:
    last = dict(checkpointer.meta(last_saved).get("last_row") or {})
  step = start
  stop = preemption.StopOnSignal()
  with stop:                     # SIGTERM: save at the step, then exit 143
    try:
      while step < cfg.steps:
        state, m, last = step_fn(state, step)
        step += 1
        chaos.point("train_step")
        if not m["finite"]:
          where = (f"the last good checkpoint (step {last_saved}) in "
                   f"{checkpointer.directory} is intact" if last_saved is not None
                   else "no checkpoint was written")
          raise NonFiniteLossError(
              f"{cfg.name or 'train'}: non-finite loss at step {step}: loss={float(m['loss'])}, "
              f"grad_norm={float(m['grad_norm'])}; the update was not applied and {where} "
              "(lower the lr, check the data and params)")
        row = dict(last) if step % cfg.log_every == 0 or step == cfg.steps else {}
        if extra_row is not None:
          row.update(extra_row(state, step))
        if row:
          writer.write(step * mu, row)
          if on_log is not None:
            on_log(step, row)
        stopping = stop.requested()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
          checkpointer.save(step * mu, state, dict(meta, step=step * mu, last_row=_plain(last)))
          last_saved = step * mu
        if bar is not None:
          bar.update(1)
          if postfix is not None:
            bar.set_postfix(**postfix(last), refresh=False)
        if stopping and step < cfg.steps:
          label = f"{cfg.name} step" if cfg.name else "step"
          raise stop.stop(f"at {label} {step} of {cfg.steps}; checkpoint saved in "
                          f"{checkpointer.directory}")
    finally:
      writer.close()
      if bar is not None:
        bar.close()
  return LoopResult(state, step, last, last_saved)
