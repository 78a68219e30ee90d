"""The chaos run (auditdm_jax/tools/chaos.py): kill moments drawn over the
interruption points, the workdir comparison, and a short real run (the init
stage, killed twice); the slow test kills the whole smoke run 12 times."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from auditdm_jax.tools import chaos
from auditdm_jax.utils import chaos as points

TRACE = ([("init", "stage_start", 1)] + [("init", "atomic_write", k) for k in range(1, 5)]
         + [("init", "stage_end", 1), ("audit", "stage_start", 1)]
         + [("audit", "train_step", k) for k in range(1, 13)]
         + [("audit", "train_ckpt_save", 1), ("audit", "stage_end", 1),
            ("mine", "stage_start", 1), ("mine", "store_built", 1),
            ("mine", "store_moved_aside", 1), ("mine", "stage_end", 1)])


def test_moments_cover_every_stage_and_both_signals():
  m = chaos.draw_moments(TRACE, 6, seed=3)
  assert len(m) == 6 and {x["stage"] for x in m} == {"init", "audit", "mine"}
  assert {x["signal"] for x in m} == {"KILL", "TERM"}
  for x in m:   # every moment is one the reference run passed
    assert (x["stage"], x["name"], x["k"]) in TRACE
  pair = [i for i in range(1, 6) if m[i]["name"] == "stage_start" and m[i]["k"] == 1
          and m[i]["stage"] == m[i - 1]["stage"]]
  assert pair, m                                   # two kills close together
  assert chaos.draw_moments(TRACE, 6, seed=3) == m  # the seed fixes them
  assert chaos.draw_moments(TRACE, 6, seed=4) != m
  # within a stage the kinds of point rotate before one repeats
  audit = [x["name"] for x in chaos.draw_moments(TRACE, 9, 0, close_pair=False)
           if x["stage"] == "audit"]
  assert len(audit) == len(set(audit)) == 3
  with pytest.raises(ValueError, match="no interruption point"):
    chaos.draw_moments([], 3, 0)


def test_points_trace_and_kill_in_their_stage(tmp_path, monkeypatch):
  import signal  # pylint: disable=import-outside-toplevel
  trace = tmp_path / "t"
  monkeypatch.setattr(points, "_STATE", {"stage": "", "counts": {}})
  monkeypatch.setenv(points.TRACE, str(trace))
  sent = []
  monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig))
  monkeypatch.setenv(points.KILL, "mine|train_step|5|TERM")
  points.set_stage("audit")
  points.point("train_step")
  points.point("stage_end")                 # another stage's end: nothing
  points.set_stage("mine")
  points.point("train_step")
  points.point("atomic_write")
  assert sent == []
  points.point("stage_end")                 # fewer than 5 steps: the stage's end
  assert sent == [signal.SIGTERM]
  points.point("stage_end")                 # fires once
  assert sent == [signal.SIGTERM]
  passed, fired = chaos.read_trace(str(trace))
  assert passed[:3] == [("audit", "train_step", 1), ("audit", "stage_end", 1),
                        ("mine", "train_step", 1)]
  assert fired == [("mine", "stage_end", 1)]
  monkeypatch.setattr(points, "_STATE", {"stage": "x", "counts": {}})
  monkeypatch.setenv(points.KILL, "x|a|1|KILL")
  points.point("a")
  assert sent[-1] == signal.SIGKILL
  monkeypatch.setenv(points.KILL, "garbled")
  monkeypatch.setattr(points, "_STATE", {"stage": "x", "counts": {}})
  with pytest.raises(ValueError, match="is not <stage>"):
    points.point("a")


def _workdir(root, figure=0.5, wall=1.0, extra=None):
  os.makedirs(root / "mine", exist_ok=True)
  (root / "audit.json").write_text(json.dumps(
      {"success_rate": {"trained": figure}, "wall_s": wall, "train_s": wall,
       "path": str(root / "audit"), **(extra or {})}))
  (root / "mine" / "metrics.jsonl").write_text(
      json.dumps({"step": 1, "loss": 0.25, "step_time": wall}) + "\n")
  (root / "stages.json").write_text(json.dumps({"init": wall}))


def test_compare_names_file_and_field(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _workdir(a)
  _workdir(b, wall=9.0)                      # times and the workdir path differ only
  assert chaos.compare(str(a), str(b)) == []
  _workdir(b, figure=0.75, extra={"new": 1})
  diffs = chaos.compare(str(a), str(b))
  assert "audit.json.success_rate.trained: 0.5 in the reference, 0.75 after the kills" in diffs
  assert "audit.json.new: only in chaos" in diffs
  (b / "mine" / "metrics.jsonl").write_text("")
  (b / "eval.json").write_text("{}")
  diffs = chaos.compare(str(a), str(b))
  assert "mine/metrics.jsonl: 1 items in the reference, 0 after the kills" in diffs
  assert "eval.json: only in the chaos run" in diffs


def test_compare_models_bit_for_bit(tmp_path):
  from auditdm_jax import models  # pylint: disable=import-outside-toplevel
  from auditdm_jax.models import presets  # pylint: disable=import-outside-toplevel
  cfg = presets.tiny_paligemma2(vocab_size=64)
  m = models.VLM.random(cfg, seed=0)
  for root in ("a", "b"):
    m.save(str(tmp_path / root / "models" / "target"))
  assert chaos.compare(str(tmp_path / "a"), str(tmp_path / "b")) == []
  import jax  # pylint: disable=import-outside-toplevel
  leaves, tree = jax.tree.flatten(m.params)
  leaves[0] = np.asarray(leaves[0]) + np.float32(1e-3)
  models.VLM(cfg, jax.tree.unflatten(tree, leaves)).save(str(tmp_path / "b" / "models" / "target"))
  diffs = chaos.compare(str(tmp_path / "a"), str(tmp_path / "b"))
  assert len(diffs) == 1 and diffs[0].startswith("models/target: parameter ") and \
      "differs" in diffs[0]


def test_chaos_run_on_the_init_stage(tmp_path):
  """Two real kills (one SIGTERM, one SIGKILL close after it) of `main`
  running the smoke config's init stage, then the comparison."""
  result = chaos.chaos_run(["--config=configs/tiny.py:smoke", "--config.stage=init"],
                           str(tmp_path), kills=2, seed=0, timeout=600, log=lambda s: None)
  assert len(result["kills"]) == 2, result
  assert {k["signal"] for k in result["kills"]} == {"KILL", "TERM"}
  assert all(k["stage"] == "init" and k["landed"].startswith("init|") for k in result["kills"])
  assert result["differences"] == [], result["differences"]
  assert json.loads((tmp_path / "chaos.json").read_text())["runs"][-1]["exit"] == 0


@pytest.mark.slow
def test_chaos_run_on_the_smoke_config(tmp_path):
  """12 kills (SIGKILL and SIGTERM) over every stage of the smoke run: the
  final workdir equals the uninterrupted run's."""
  result = chaos.chaos_run(["--config=configs/tiny.py:smoke"], str(tmp_path), kills=12, seed=0,
                           timeout=1800, log=print)
  assert len(result["kills"]) >= 12, result["kills"]
  assert {k["signal"] for k in result["kills"]} == {"KILL", "TERM"}
  assert {"init", "pretrain", "audit", "mine", "rectify", "eval", "report"} <= \
      set(result["stages_killed"]), result["stages_killed"]
  assert result["differences"] == [], result["differences"]


def test_seed_workdir_copies_all_but_the_lock(tmp_path):
  src = tmp_path / "src"
  (src / "models" / "m").mkdir(parents=True)
  (src / "models" / "m" / "auditdm_model.json").write_text("{}")
  (src / "stages.json").write_text('{"init": 1.0}')
  (src / ".auditdm.lock.3").write_text("held")
  chaos.seed_workdir(str(src), str(tmp_path / "dst"))
  got = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "dst")
               for d, _, fs in os.walk(tmp_path / "dst") for f in fs)
  assert got == ["models/m/auditdm_model.json", "stages.json"]
  with pytest.raises(FileExistsError, match="fresh copy"):
    chaos.seed_workdir(str(src), str(tmp_path / "dst"))
  with pytest.raises(FileNotFoundError, match="no such directory"):
    chaos.seed_workdir(str(tmp_path / "nope"), str(tmp_path / "x"))


def test_compare_ignores_run_history_not_figures(tmp_path):
  """Whether a training run's last process resumed, and where, is run
  history; its final figures are not."""
  a, b = tmp_path / "a", tmp_path / "b"
  _workdir(a, extra={"train": {"resumed": False, "start_step": 0, "final": {"loss": 0.1}}})
  _workdir(b, extra={"train": {"resumed": True, "start_step": 300, "final": {"loss": 0.1}}})
  assert chaos.compare(str(a), str(b)) == []
  _workdir(b, extra={"train": {"resumed": True, "start_step": 300, "final": {}}})
  assert chaos.compare(str(a), str(b)) == ["audit.json.train.final.loss: only in reference"]
