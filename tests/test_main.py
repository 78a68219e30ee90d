"""The entry point: runs the tiny config's implemented stages, refuses bad
configs and unimplemented stages with clear messages."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from auditdm_jax import config_check, main, models, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  try:
    import tiny  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  return tiny.get_config()


def test_init_stage_writes_loadable_models(tmp_path):
  config = _tiny_config()
  config.models = ml_collections.ConfigDict({
      "target_small": config.models.target_small, "auditor": config.models.auditor})
  config.stage = "init"
  walls = main.run(config, str(tmp_path))
  assert set(walls) == {"init"}
  summary = json.load(open(tmp_path / "models.json"))
  assert summary["auditor"]["family"] == "gemma3" and summary["auditor"]["role"] == "auditor"
  m = models.load(str(tmp_path / "models" / "target_small"))
  assert m.config.family == "paligemma"
  # A second run reuses the checkpoints instead of re-initialising them.
  before = os.path.getmtime(tmp_path / "models" / "auditor" / "auditdm_model.json")
  main.run(config, str(tmp_path))
  assert json.load(open(tmp_path / "models.json"))["auditor"]["reused"]
  assert os.path.getmtime(tmp_path / "models" / "auditor" / "auditdm_model.json") == before


def test_config_errors_name_every_problem():
  config = _tiny_config()
  config.stage = "bogus"
  config.models.ref_a.role = "judge"
  config.models.ref_b.preset = "gpt-9"
  config.models.auditor.preset = ""
  config.models.target_large.checkpoint = "/nonexistent/paligemma2-3b-pt-448.npz"
  config.models.target_small.finetune_steps = -5
  config.pretrain.base_first = dict(steps=10, skills=("spatial", "colours"))
  config.pretrain.base.phrase_aux = -1.0
  config.mesh = {"data": 1, "fsdp": -1, "tensor": -1}
  config.models.target_small.partition_rules = [["(unclosed", [None]]]
  config.audit.diversity.mode = "novelty"
  config.audit.seed_budget = 0
  config.pretrain.auditor.descriptor_rate = 2.0
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check(config)
  msg = str(e.value)
  for part in ("stage is 'bogus'", "models.ref_a.role is 'judge'", "unknown preset 'gpt-9'",
               "models.auditor: give a 'checkpoint', a 'preset', or both",
               "models.target_large.checkpoint: '/nonexistent/paligemma2-3b-pt-448.npz' "
               "does not exist",
               "models.target_small.finetune_steps must be an int >= 0",
               "pretrain.base_first.skills must be a non-empty list of",
               "pretrain.base.phrase_aux must be a number >= 0",
               "mesh must map data / fsdp / model to sizes",
               "models.target_small.partition_rules: partition rule 0: bad regex",
               "audit.diversity: audit.diversity.mode must be one of",
               "audit.seed_budget must be an int >= 1",
               "pretrain.auditor.descriptor_rate must be in [0, 1]"):
    assert part in msg


def test_every_stage_is_built():
  assert set(stages.ORDER) == set(stages.IMPLEMENTED) and not stages.PLANNED
  with pytest.raises(ValueError, match="unknown stage 'bogus'"):
    stages.get("bogus")


def test_cli_names_a_missing_input(tmp_path):
  """A stage run alone before the stages it reads from fails with a message
  naming what is missing, not a traceback."""
  proc = subprocess.run(
      [sys.executable, "-m", "auditdm_jax.main", f"--config={ROOT}/configs/tiny.py",
       f"--workdir={tmp_path}", "--config.stage=rectify"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "no exemplar store" in proc.stderr and "run the mine stage first" in proc.stderr


def test_rounds_schedule_comes_from_the_declarations():
  """`all` with rounds=3: the stages in order, rounds 2 and 3 of the stages
  that declare in_rounds right after the last of them."""
  from auditdm_jax.pipeline import rounds  # pylint: disable=import-outside-toplevel
  keys = [k for _, _, k in rounds.schedule(stages.STAGES, 3)]
  assert stages.LOOP == ("audit", "mine", "rectify")
  assert keys == ["init", "pretrain", "audit", "mine", "rectify", "audit_r2", "mine_r2",
                  "rectify_r2", "audit_r3", "mine_r3", "rectify_r3", "eval", "report"]
  assert [k for _, _, k in rounds.schedule(stages.STAGES, 1)] == list(stages.ORDER)


def _cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "auditdm_jax.main", *args],
                        capture_output=True, text=True, cwd=cwd, timeout=120)


def _one_line(proc) -> str:
  """The only non-empty line on stderr (no traceback, no usage dump)."""
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  return lines[0]


@pytest.mark.parametrize("args,parts", [
    # An argument the config does not accept: named, with the accepted ones.
    (("--config=configs/tiny.py:bogus",),
     ("--config=configs/tiny.py:bogus", "'bogus'", "'smoke'", "'judge'")),
    (("--config=configs/audit_gemma3.py:colour=red",),
     ("unknown config argument 'colour'", "known: ['ckpt_dir'", "'slice'")),
    # A missing config file, with or without an argument.
    (("--config=configs/nope.py",), ("config file 'configs/nope.py' does not exist",)),
    (("--config", "configs/nope.py:smoke"), ("config file 'configs/nope.py' does not exist",)),
    # Overrides of the wrong type, or of a field the config does not have.
    (("--config=configs/tiny.py", "--config.seed=abc"), ("--config.seed=abc", "'abc'")),
    (("--config=configs/tiny.py", "--config.models.nokey.x=1"),
     ("--config.models.nokey.x", "no field 'nokey'")),
])
def test_config_errors_are_one_line_exit_2(tmp_path, args, parts):
  proc = _cli(*args, f"--workdir={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _one_line(proc)
  assert line.startswith("error: ")
  for part in parts:
    assert part in line, (part, line)
  assert not os.listdir(tmp_path)        # nothing built, not even the lock


def test_load_model_names_the_stage_the_model_and_the_path(tmp_path):
  from auditdm_jax.pipeline import layout
  with pytest.raises(FileNotFoundError) as e:
    layout.load_model(str(tmp_path), "ref_a", "mine", "run the earlier stages first")
  msg = str(e.value)
  assert msg.startswith("mine: model 'ref_a' has no checkpoint at ")
  assert os.path.join(str(tmp_path), "models", "ref_a") in msg and msg.endswith(
      "run the earlier stages first")


def test_summaries_are_written_and_read_through_the_layout(tmp_path):
  from auditdm_jax.pipeline import layout
  w = str(tmp_path)
  assert layout.read_summary(w, "audit", {}) == {}            # not written yet
  path = layout.write_summary(w, "audit", '{"steps": 3}')
  assert path == os.path.join(w, "audit.json") and layout.read_summary(w, "audit") == {"steps": 3}
  assert not [f for f in os.listdir(w) if f != "audit.json"]   # no temp file left behind
  with open(layout.summary_path(w, "mine"), "w") as f:
    f.write('{"seeds": 1')                                      # cut off mid-write
  with pytest.raises(ValueError, match=r"mine stage's summary .*mine.json is not valid JSON"):
    layout.read_summary(w, "mine")
  with pytest.raises(KeyError, match="no summary file for stage 'audti'"):
    layout.write_summary(w, "audti", "{}")


def test_shared_section_defaults_reach_every_reader():
  """audit.answer_tokens has one default (4) and one spelling: the audit
  stage, the planner and the named-benchmark evaluation read the same value,
  and an override reaches all of them."""
  import ml_collections
  from auditdm_jax.pipeline import sections
  from auditdm_jax.stages import audit, evaluate
  config = ml_collections.ConfigDict(dict(audit=dict(steps=3), eval=dict(batch=8)))
  assert audit.STAGE.settings(config) == sections.settings(config, "audit")
  assert audit.STAGE.settings(config)["answer_tokens"] == 4
  assert evaluate.STAGE.settings(config) == dict(sections.EVAL, batch=8)
  config.audit.answer_tokens = 16
  assert sections.settings(config, "audit")["answer_tokens"] == 16
  assert sections.settings(ml_collections.ConfigDict(), "audit") == sections.AUDIT
  with pytest.raises(KeyError, match="no shared defaults for config section 'mien'"):
    sections.settings(config, "mien")
