"""The closed loop on the smoke config: audit -> mine (crash and restart) ->
rectify (resume) -> report, mechanics only (the quality figures come from the
full tiny config, docs/audit.md).

Smoke models learn nothing, so a real audit round finds nothing to mine. The
mining tests therefore script the round (`Auditing.run`, tested on real models
in test_audit.py): the auditor asks each seed's own question K times, the
references answer the truth, target_small gives a wrong answer of the right
kind (the first answer of the question's skill that is not the truth) and
target_large says the truth. Everything after the round is the real code."""

import json
import os

import numpy as np
import pytest
from absl import flags

from auditdm_jax import config_check, models
from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.data import exemplars_tfds as store
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes import parse
from auditdm_jax.scenes.world import Scene
from auditdm_jax.pipeline import layout
from auditdm_jax.stages import audit, mine, pretrain, rectify, report
from auditdm_jax.utils.answers import answer_key
from configs import tiny

flags.FLAGS.mark_as_parsed()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("loop"))
  c = tiny.get_config("smoke")
  config_check.check(c)
  pretrain.run(c, wd)
  audit.run(c, wd)
  return wd


def _wrong(context, question):
  q = parse.try_answer(Scene.from_json(context), question)[0]
  return next(a for a in gaps_lib.SKILL_ANSWERS[q.skill] if a != q.answer)


def scripted_run(self, seeds, pairings, rng, num_samples=None, small_says=None):
  del pairings, rng
  k = self.k if num_samples is None else num_samples
  rows = [s for s in seeds for _ in range(k)]
  n = len(rows)
  truth = [parse.try_answer(Scene.from_json(s.context), s.question)[0].answer for s in rows]
  answers = {"ref_a": truth, "ref_b": list(truth), "target_large": list(truth),
             "target_small": [small_says or _wrong(s.context, s.question) for s in rows]}
  # The real answer reading (answer spaces of the scene editor).
  parsed = self.parse(answers, [s.context for s in rows], [s.question for s in rows])
  cons, has = rollout_lib.consensus_text([parsed[r] for r in self.references], "majority")
  fails = np.array([answer_key(a) != c for a, c in zip(answers[self.target], cons)])
  return rollout_lib.Rollout(
      pairings=["question"] * n, texts=[[s.question] for s in rows], tokens=[[[]]] * n,
      prompts=[[[]]] * n, images_in=[[s.image] for s in rows], question=[s.question for s in rows],
      image=np.stack([s.image for s in rows]), context=[s.context for s in rows],
      valid=np.ones(n, bool), reason=[""] * n, factor=[""] * n, answers=answers,
      parsed=parsed, reward=fails.astype(np.float32), has_consensus=has,
      success=fails & has, consensus=cons, answered=np.ones(n, bool))


@pytest.fixture()
def scripted(monkeypatch):
  monkeypatch.setattr(rollout_lib.Auditing, "run", scripted_run)


def test_mine_restart_continues_where_it_stopped(workdir, scripted):
  del scripted
  c = tiny.get_config("smoke")
  c.mine.seeds = 12                      # 3 chunks of 4 seeds
  c.mine.auditors = ("auditor_trained",)  # one checkpoint: 3 chunks in all
  out = mine.run(c, workdir)
  chunks_dir, _ = layout.store_paths(workdir)
  files = store.chunk_files(chunks_dir)
  assert len(files) == 3 and out["chunks_mined_now"] == 3
  full = [r["id"] for r in store.iter_chunks(chunks_dir)]
  # K samples of one question on one image are one probe (deduplicated).
  assert len(full) == len(set(full)) == out["probes"] == 12
  assert out["exemplars_of"]["target_large"] == 0
  assert out["exemplars_of"]["target_small"] == 12
  # The references answer the truth: every exemplar is a true failure, rightly labelled.
  assert out["exemplar_precision"] == 1.0 and out["label_precision"] == 1.0
  assert sum(t["count"] for t in out["failure_types"]) == out["exemplars_of"]["target_small"]
  for t in out["failure_types"]:
    assert t["share"] == {"target_large": 0.0, "target_small": 1.0}
  # A crash after two chunks: the third is missing; a restart mines only it,
  # and the store ends up as after the uninterrupted run.
  os.remove(files[-1])
  mtimes = [os.path.getmtime(f) for f in files[:2]]
  again = mine.run(c, workdir)
  assert again["chunks_mined_now"] == 1
  assert [os.path.getmtime(f) for f in files[:2]] == mtimes
  assert [r["id"] for r in store.iter_chunks(chunks_dir)] == full
  src = store.data_source(layout.published_path(workdir), "exemplars")
  pl = store.data_source(layout.published_path(workdir), "pseudo_labelled")
  assert len(src) + len(pl) == again["probes"]
  for i in range(len(src)):
    r = src[i]
    assert r["failed"] and r["auditor"] == "auditor_trained"
    assert r["auditor_step"] == c.audit.steps
    refs = [r["answers"][m] for m in again["references"]]
    assert r["pseudo_label"] in refs
  data = json.load(open(os.path.join(workdir, "mine.json")))
  for t in data["failure_types"]:
    assert set(t["share"]) == set(data["targets"]) and t["count"] >= 0


def test_babbling_target_yields_no_exemplars(workdir, monkeypatch, tmp_path):
  """The reward-hacking case at the mining end: a target that answers
  "nononono" to every question (outside every answer space) has not
  answered, so it fails nothing: no exemplar, no failure type of it."""
  def babble(self, seeds, pairings, rng, num_samples=None):
    return scripted_run(self, seeds, pairings, rng, num_samples, small_says="nononono")
  monkeypatch.setattr(rollout_lib.Auditing, "run", babble)
  wd = str(tmp_path / "wd")
  os.makedirs(os.path.join(wd, "models"))
  for name in os.listdir(os.path.join(workdir, "models")):
    os.symlink(os.path.join(workdir, "models", name), os.path.join(wd, "models", name))
  os.symlink(os.path.join(workdir, "data"), os.path.join(wd, "data"))
  c = tiny.get_config("smoke")
  c.mine.seeds = 8
  c.mine.auditors = ("auditor_trained",)
  out = mine.run(c, wd)
  assert out["probes"] == 8
  assert out["exemplars_of"]["target_small"] == 0 and out["exemplars_of"]["target_large"] == 0
  assert all(t["count"] == 0 for t in out["failure_types"])


def test_rectify_trains_saves_and_resumes(workdir, scripted):
  del scripted
  c = tiny.get_config("smoke")
  c.mine.seeds = 12
  c.mine.auditors = ("auditor_trained",)
  mine.run(c, workdir)
  c.rectify.steps = 2
  out = rectify.run(c, workdir)
  assert out["train"]["steps"] == 2 and not out["train"]["resumed"] and not out["skipped"]
  assert out["pseudo_labelled_rows"] > 0
  for key in ("accuracy_before", "accuracy_after"):
    assert set(out[key]) == {"target_small", "target_large", "ref_a", "ref_b"}
    assert "overall" in out[key]["target_small"]
  before = models.load(os.path.join(workdir, "models", "target_small")).params
  after = models.load(os.path.join(workdir, "models", "target_small_rectified")).params
  assert not np.array_equal(np.asarray(before["llm"]["embedder"]["input_embedding"]),
                            np.asarray(after["llm"]["embedder"]["input_embedding"]))
  # The vision tower is frozen by default.
  np.testing.assert_array_equal(np.asarray(before["img"]["embedding"]["kernel"]),
                                np.asarray(after["img"]["embedding"]["kernel"]))
  c.rectify.steps = 3
  out = rectify.run(c, workdir)
  assert out["train"]["resumed"] and out["train"]["steps"] == 3
  assert set(out["train"]["final"]) >= {"loss", "lr", "grad_norm"}
  # Run again once training is done (as after a kill before its outputs were
  # written): no step runs, and the final figures are the saved ones.
  again = rectify.run(c, workdir)
  assert again["train"]["final"] == out["train"]["final"]
  assert again["accuracy_after"] == out["accuracy_after"]
  rep = report.run(c, workdir)
  assert os.path.exists(rep["html"])
  saved = json.load(open(os.path.join(workdir, "report.json")))
  assert saved["accuracy_after"]["target_small"] == out["accuracy_after"]["target_small"]


def test_rectify_bootstrap_trains_on_every_probe(workdir, tmp_path):
  """Bootstrap: no labelled data, every consensus-backed probe (exemplars and
  pseudo-labelled ones) is a training row."""
  import shutil  # pylint: disable=import-outside-toplevel
  wd = str(tmp_path / "boot")
  shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns("rectify", "*_rectified"))
  c = tiny.get_config("smoke")
  c.rectify.update(dict(strategy="bootstrap", steps=1))
  probes = json.load(open(os.path.join(wd, "mine.json")))["probes"]
  out = rectify.run(c, wd)
  assert out["strategy"] == "bootstrap" and out["pseudo_labelled_rows"] == probes
  assert out["train"]["steps"] == 1


def test_rectify_without_exemplars_keeps_the_target(workdir, tmp_path):
  """A round that found nothing does not fail the pipeline: the target is
  measured and left as it is."""
  import shutil  # pylint: disable=import-outside-toplevel
  wd = str(tmp_path / "empty")
  shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns("mine", "rectify", "*_rectified"))
  chunks, tfds_dir = layout.store_paths(wd)
  store.write_chunk(store.chunk_path(chunks, "auditor_trained", 0), [])
  store.publish(chunks, tfds_dir)
  c = tiny.get_config("smoke")
  out = rectify.run(c, wd)
  assert "no usable exemplar of target_small" in out["skipped"] and out["checks"] == []
  assert out["accuracy_after"] == out["accuracy_before"]
  assert not os.path.exists(os.path.join(wd, "models", "target_small_rectified"))
