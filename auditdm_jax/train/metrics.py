"""Training metrics: stdout, `workdir/metrics.jsonl` and TensorBoard.

One JSON object per logged step ({"step": s, "loss": ..., ...}). On resume
from step S the file is first cut back to the lines with step <= S (a torn
last line from a killed run is dropped too), so that every step appears once
however often the run was interrupted; TensorBoard events after S are purged
with `purge_step` for the same reason.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

from auditdm_jax.utils.fileio import atomic_write_text


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Every parseable line of a metrics.jsonl file (torn lines skipped)."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), int):
        out.append(row)
  return out


def truncate_metrics(path: str, last_step: int) -> int:
  """Keeps only the lines with step <= last_step; returns how many remain."""
  if not os.path.exists(path):
    return 0
  keep = [r for r in read_metrics(path) if r["step"] <= last_step]
  atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
  return len(keep)


def summary_writer_cls():
  """tensorboardX.SummaryWriter, imported without PyTorch: tensorboardX imports
  torch whenever it is installed (seconds and a lot of memory, for nothing
  here); a None entry in sys.modules makes that optional import fail."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


class MetricsWriter:
  """Writes metric rows to stdout, a JSON-lines file and TensorBoard."""

  def __init__(self, workdir: str, start_step: int, *, tensorboard: bool = True,
               echo: bool = True, write_fn=None, enabled: bool = True):
    # enabled=False (JAX processes other than 0): writes nothing anywhere.
    self.enabled = enabled
    self.echo = echo
    self._tb = None
    self._file = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    truncate_metrics(self.path, start_step)
    self._file = open(self.path, "a")  # noqa: SIM115  (closed by close())
    self._write = write_fn or (lambda s: print(s, file=sys.stdout, flush=True))
    if tensorboard:
      self._tb = summary_writer_cls()(logdir=os.path.join(workdir, "tb"),
                               purge_step=start_step + 1 if start_step > 0 else None)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = v.item() if hasattr(v, "item") else v
      row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self.echo:
      self._write(f"step {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items()
                                              if k != "step"))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
