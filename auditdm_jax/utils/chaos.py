"""Named interruption points for the chaos run (`auditdm_jax.tools.chaos`).

Writers and loops call `point(name)` at the moments an interruption is most
dangerous: inside an atomic write before its rename, around checkpoint saves,
between a store's build and its publication, at every training step, at a
stage's start and end, while a round's links are made. `main` names the
stage in progress (`set_stage`). Without the environment variables below a
point costs one dict lookup.

  AUDITDM_CHAOS_TRACE=<file>   each point appends "<stage>\\t<name>\\t<k>" (the
                               k-th point of that name in that stage, in this
                               process)
  AUDITDM_CHAOS_KILL=<stage>|<name>|<k>|<KILL or TERM>
                               the process sends itself the signal at the k-th
                               point <name> of <stage>, or at that stage's end
                               when the stage passes fewer (a resumed stage
                               redoes less), and logs "KILL\\t<stage>\\t<name>\\t<k>"
                               to the trace first

Only the chaos tool sets them; nothing here changes what a run computes.
"""

from __future__ import annotations

import os
import signal

TRACE, KILL = "AUDITDM_CHAOS_TRACE", "AUDITDM_CHAOS_KILL"
_STATE: dict = {"stage": "", "counts": {}}


def set_stage(name: str) -> None:
  _STATE["stage"] = name


def _log(line: str) -> None:
  path = os.environ.get(TRACE)
  if path:
    with open(path, "a") as f:
      f.write(line + "\n")
      f.flush()
      os.fsync(f.fileno())


def point(name: str) -> None:
  """One interruption point (see the module docstring)."""
  if TRACE not in os.environ and KILL not in os.environ:
    return
  stage = _STATE["stage"]
  counts = _STATE["counts"]
  k = counts[(stage, name)] = counts.get((stage, name), 0) + 1
  _log(f"{stage}\t{name}\t{k}")
  kill = os.environ.get(KILL, "")
  if not kill:
    return
  try:
    want_stage, want_name, want_k, sig = kill.split("|")
  except ValueError as e:
    raise ValueError(f"{KILL}={kill!r} is not <stage>|<name>|<k>|<KILL or TERM>") from e
  if stage != want_stage or _STATE.get("fired"):
    return
  if (name == want_name and k == int(want_k)) or name == "stage_end":
    _STATE["fired"] = True
    _log(f"KILL\t{stage}\t{name}\t{k}")
    os.kill(os.getpid(), signal.SIGKILL if sig.upper() in ("KILL", "SIGKILL") else signal.SIGTERM)
