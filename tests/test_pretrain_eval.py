"""The pretrain and eval stages on the smoke version of the tiny config:
mechanics (data built once, models trained and saved with the world
tokenizer, gaps applied, eval.json schema, reruns skip finished work).
The quality figures come from the full stage (docs/scene_world.md)."""

import json
import os

import numpy as np
import pytest
from absl import flags

from auditdm_jax import config_check, models
from auditdm_jax.stages import evaluate, pretrain
from configs import tiny

flags.FLAGS.mark_as_parsed()
# Compiles of five models' training and sampling dominate (~2.5 min on 2 CPU
# cores); CI also runs the same stages through main on the smoke config.
slow = pytest.mark.slow


def micro_config():
  """The smoke config, plus the recipe knobs configs/tiny.py leaves off: a
  curriculum phase and the phrase grounding loss."""
  c = tiny.get_config("smoke")
  c.pretrain.base_first = dict(steps=2, batch=8, lr=1e-3, warmup=1, checkpoint_every=2,
                               log_every=1, skills=("spatial", "size"), phrase_aux=1.0,
                               frozen=("^img/",))
  c.pretrain.base.phrase_aux = 0.5
  c.pretrain.base.phrase_skills = ("spatial",)
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("tiny"))
  c = micro_config()
  config_check.check(c)
  pretrain.run(c, wd)   # (the init stage is covered by test_main; pretrain does not need it)
  return wd


@slow
def test_pretrain_writes_trained_models_with_world_tokenizer(workdir):
  with open(os.path.join(workdir, "pretrain.json")) as f:
    status = json.load(f)
  for key in ("vision", "base_first", "base", "base_tune", "target_small", "target_large",
              "ref_a", "ref_b", "auditor"):
    assert key in status, key
  assert status["base_first"]["skills"] == ["spatial", "size"]
  assert "phrase_loss" in status["base_first"]["final"] and "phrase_loss" in status["base"]["final"]
  assert len(status["vision"]["accuracy"]) == 7          # + row, column, two counts
  assert status["target_small"]["gaps"] == ["counting:n>=4", "colour:purple"]
  # The base's learning curve (configs/tiny.py: eval_every, curve_records): at
  # its last step, every skill of the benchmark's first records.
  curve = status["base"]["curve"]
  assert curve and curve[-1]["step"] == status["base"]["steps"]
  assert set(curve[-1]) >= {"step", "overall", "colour", "spatial"}
  assert all(0.0 <= v <= 1.0 for k, v in curve[-1].items() if k != "step")
  small = models.load(os.path.join(workdir, "models", "target_small"))
  large = models.load(os.path.join(workdir, "models", "target_large"))
  assert small.tokenizer is not None and small.tokenizer.vocab_size <= small.config.text.vocab_size
  assert small.config.text.depth < large.config.text.depth
  auditor = models.load(os.path.join(workdir, "models", "auditor"))
  assert auditor.config.family == "gemma3" and auditor.tokenizer.family == "gemma3"
  # The shared vision tower reached every model (same pretrained encoder).
  a = small.params["img"]["embedding"]["kernel"]
  b = auditor.params["img"]["embedding"]["kernel"]
  assert a.shape == b.shape


@slow
def test_pretrain_rerun_skips_finished_work(workdir, capsys):
  before = os.path.getmtime(os.path.join(workdir, "models", "ref_a"))
  pretrain.run(micro_config(), workdir)
  assert os.path.getmtime(os.path.join(workdir, "models", "ref_a")) == before
  assert "trained" not in capsys.readouterr().out


@slow
def test_pretrain_retrains_a_target_whose_gaps_changed(workdir, capsys):
  c = micro_config()
  c.models.target_large.gaps = ("shape:colour=blue",)
  before = {n: os.path.getmtime(os.path.join(workdir, "models", n))
            for n in ("ref_a", "target_large")}
  pretrain.run(c, workdir)
  out = capsys.readouterr().out
  assert "target_large was trained with gaps ['existence:no', 'spatial:left']" in out
  assert os.path.getmtime(os.path.join(workdir, "models", "ref_a")) == before["ref_a"]
  assert os.path.getmtime(os.path.join(workdir, "models", "target_large")) > before["target_large"]
  with open(os.path.join(workdir, "pretrain.json")) as f:
    assert json.load(f)["target_large"]["gaps"] == ["shape:colour=blue"]
  pretrain.run(micro_config(), workdir)      # back to the config's gaps, for the tests after
  assert "target_large was trained with gaps ['shape:colour=blue']" in capsys.readouterr().out


@slow
def test_eval_json_schema(workdir):
  out = evaluate.run(micro_config(), workdir)
  with open(os.path.join(workdir, "eval.json")) as f:
    data = json.load(f)
  assert set(data["models"]) == {"target_small", "target_large", "ref_a", "ref_b", "auditor"}
  for m in data["models"].values():
    assert m["role"] in ("target", "reference", "auditor")
    for v in m["accuracy"].values():
      assert v is None or 0.0 <= v <= 1.0
    assert "overall" in m["accuracy"]
  ts = data["models"]["target_small"]
  assert ts["gaps"] == ["counting:n>=4", "colour:purple"]
  assert set(ts["gap_accuracy"]) == set(ts["gaps"])
  assert data["benchmark"]["records"] == 64
  assert any(c["model"] == "ref_a" and c["check"] == "overall" for c in data["checks"])
  assert out["models"]["ref_a"]["accuracy"]["overall"] == pytest.approx(
      data["models"]["ref_a"]["accuracy"]["overall"])


def test_read_curve_keeps_the_eval_rows(tmp_path):
  rows = [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.5, "eval/acc/colour": 0.5,
                                      "eval/acc/overall": 0.25},
          {"step": 40, "eval/acc/colour": 1.0, "eval/acc/overall": 0.75}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 50, "eval/ac')  # torn
  assert pretrain.read_curve(str(tmp_path)) == [
      {"step": 20, "colour": 0.5, "overall": 0.25}, {"step": 40, "colour": 1.0, "overall": 0.75}]


def test_derive_params_takes_a_layer_subset():
  from auditdm_jax.models import presets
  base = presets.get_preset("scene-paligemma2-large")
  small = presets.get_preset("scene-paligemma2-small")
  params = models.VLM.random(base, seed=0).params
  out = pretrain.derive_params(params, base, small)
  q = np.asarray(params["llm"]["layers"]["attn"]["q_einsum"]["w"])
  assert np.array_equal(out["llm"]["layers"]["attn"]["q_einsum"]["w"], q[[0, 1]])
  spread = pretrain.derive_params(params, base, small, keep=[0, 3])
  assert np.array_equal(spread["llm"]["layers"]["attn"]["q_einsum"]["w"], q[[0, 3]])
  with pytest.raises(ValueError, match="cannot derive"):
    pretrain.derive_params(out, small, base)
  with pytest.raises(ValueError, match=r"keep=\[1, 1\] must name 2 distinct layers"):
    pretrain.derive_params(params, base, small, keep=[1, 1])


@slow
def test_audit_stage_writes_audit_json_and_resumes_exactly(workdir, tmp_path):
  """Two steps, then a rerun asked for three resumes from step 2; it ends
  with the same auditor as an uninterrupted three-step run (in a copy of the
  workdir), and finds.jsonl holds each step's finds once."""
  import shutil  # pylint: disable=import-outside-toplevel

  from auditdm_jax.stages import audit  # pylint: disable=import-outside-toplevel
  fresh = str(tmp_path / "fresh")
  shutil.copytree(workdir, fresh)
  c = micro_config()
  c.audit.steps = 2
  audit.run(c, workdir)
  with open(os.path.join(workdir, "audit.json")) as f:
    out = json.load(f)
  assert out["steps"] == 2 and out["budget"] == c.audit.eval_budget
  assert set(out["success_rate"]) == {"trained", "warm_start"}
  for v in out["success_rate"].values():
    assert 0.0 <= v <= 1.0
  c.audit.steps = 3
  audit.run(c, workdir)
  audit.run(c, fresh)
  resumed = models.load(os.path.join(workdir, "models", "auditor_trained")).params
  straight = models.load(os.path.join(fresh, "models", "auditor_trained")).params
  import jax  # pylint: disable=import-outside-toplevel
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  with open(os.path.join(workdir, "audit", "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if line.strip()]
  assert steps == [1, 2, 3]
  # The diversity archive resumes with the rest: the same journal, the same
  # archive, the per-seed search and diversity figures written.
  assert c.audit.diversity.mode == "descriptors"
  journals = []
  for wd in (workdir, fresh):
    with open(os.path.join(wd, "audit", "diversity.jsonl")) as f:
      journals.append([json.loads(line) for line in f if line.strip()])
  assert [r["step"] for r in journals[0]] == [1, 2, 3] and journals[0] == journals[1]
  with open(os.path.join(workdir, "audit.json")) as f:
    a, = [json.load(f)]
  with open(os.path.join(fresh, "audit.json")) as f:
    b = json.load(f)
  assert a["archive"] == b["archive"] and sum(a["archive"]["tries"].values()) == 3 * (
      c.audit.prompts_per_step * c.audit.grpo.num_samples)
  # search = "archive": the trained auditor searches by its archive's weights,
  # and evenly beside it
  assert set(a["success_rate_per_seed"]) == {"budget", "trained", "warm_start"}
  assert set(a["diversity"]) == {"trained", "warm_start"}
  assert a["search"]["descriptors"] == "archive" and a["search"]["seeds"] >= 1
  # one weight per cell (pairing x descriptor) the mixture can draw; an edit
  # alone asks nothing, so its cell names no descriptor
  from auditdm_jax.audit import diversity, rollout  # pylint: disable=import-outside-toplevel
  cells = [diversity.split_cell(k) for k in a["search"]["weights"]]
  drawn = {p for p, w in c.audit.mixture.items() if w > 0}
  assert {p for p, _ in cells} == drawn
  for p in drawn:
    want = set(c.audit.diversity.descriptors) if "question" in rollout.PAIRINGS[p] else {""}
    assert {d for q, d in cells if q == p} == want, p
  assert set(a["search"]["trained_uniform"]) == {"per_probe", "per_seed", "diversity"}
