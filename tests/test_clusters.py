"""Failure types without skill labels (mine/clusters/): embedding, HDBSCAN
clusters, naming validated by the references, the check against the labels."""

from __future__ import annotations

import types

import numpy as np
import pytest

from auditdm_jax.mine import clusters
from auditdm_jax.mine import failure_types as ft
from auditdm_jax.sampling import SamplingParams
from auditdm_jax.scenes import gaps as G
from auditdm_jax.scenes.mining import KNOWLEDGE
from auditdm_jax.scenes.world import Obj, Scene

TARGETS = ("t_small", "t_large")
IMAGE = np.zeros((8, 8, 3), np.uint8)


def _rec(i, skill, label, failed, question=None, image=None, context=""):
  return {"id": f"id{i:04d}", "skill": skill, "pseudo_label": label, "factor": "",
          "failed": list(failed), "question": question or f"what {skill} is it?",
          "route": "question", "auditor_text": question or "", "context": context,
          "answers": {t: label for t in TARGETS}, "image": IMAGE if image is None else image}


def _blobs(spec, seed=0, spread=0.05):
  """records + features: each (skill, label, n_failed, n_ok) is one blob."""
  rng = np.random.default_rng(seed)
  recs, xs = [], []
  for b, (skill, label, n_fail, n_ok) in enumerate(spec):
    centre = np.zeros(len(spec) * 2)
    centre[2 * b] = 1.0
    for j in range(n_fail + n_ok):
      recs.append(_rec(len(recs), skill, label, ("t_small",) if j < n_fail else ()))
      xs.append(centre + rng.normal(0, spread, centre.shape))
  return recs, np.asarray(xs, np.float32)


def test_well_separated_blobs_are_recovered_exactly():
  recs, x = _blobs([("colour", "purple", 20, 10), ("counting", "5", 30, 5),
                    ("shape", "circle", 12, 30)])
  types_, labels = clusters.unlabelled_types(recs, x, TARGETS, "t_small",
                                             clusters.settings(), knowledge=KNOWLEDGE)
  blob = np.repeat([0, 1, 2], [30, 35, 42])
  failed = np.array([bool(r["failed"]) for r in recs])
  # Every exemplar lands in its blob's cluster, and the other probes that
  # join one (by their nearest centroid, within 1.25x its largest member
  # distance: nearly all of them here) join their own blob's.
  assert (labels[failed] >= 0).all() and (labels[~failed] >= 0).mean() > 0.9
  for b in range(3):
    assert len(set(labels[(blob == b) & (labels >= 0)])) == 1
  by_fail = {t.count("t_small"): t for t in types_}
  assert sorted(by_fail) == [12, 20, 30]
  assert by_fail[20].rate["t_small"] == pytest.approx(20 / by_fail[20].probes)
  assert 20 / 30 <= by_fail[20].rate["t_small"] <= 1.0
  check = clusters.label_check(recs, labels, [
      {"name": "colour: purple", "skill": "colour", "labels": ["purple"]},
      {"name": "counting: 5", "skill": "counting", "labels": ["5"]},
      {"name": "shape: circle", "skill": "shape", "labels": ["circle"]}])
  assert check["ari_skill_answer"] == pytest.approx(1.0)
  assert check["ari_labelled_types"] == pytest.approx(1.0)
  assert check["noise_fraction"] == 0 and check["clusters"] == 3
  # Ranked by the reliable failure rate beyond the base rate, as the labelled types.
  assert types_[0].count("t_small") == 30
  assert types_[0].ids[0] in {r["id"] for r in recs if r["skill"] == "counting"}


def test_merged_labelled_types_are_the_partition_the_check_uses():
  # Two answers in one blob: wrong against skill:answer, right against the
  # labelled type that merged them into a range.
  recs, x = _blobs([("counting", "5", 15, 0), ("counting", "6", 15, 0), ("colour", "red", 15, 0)])
  x[15:30] = x[:15] + np.random.default_rng(1).normal(0, 0.01, x[:15].shape)
  _, labels = clusters.unlabelled_types(recs, x, TARGETS, "t_small", clusters.settings(),
                                        knowledge=KNOWLEDGE)
  check = clusters.label_check(recs, labels, [
      {"name": "counting: 5-6", "skill": "counting", "labels": ["5", "6"]},
      {"name": "colour: red", "skill": "colour", "labels": ["red"]}])
  assert check["ari_labelled_types"] == pytest.approx(1.0)
  assert check["ari_skill_answer"] < 0.8


def test_noise_counts_as_singletons_and_a_random_partition_scores_near_zero():
  rng = np.random.default_rng(0)
  recs = [_rec(i, "colour", ["red", "blue"][i % 2], ("t_small",)) for i in range(60)]
  labels = rng.integers(-1, 3, 60)
  check = clusters.label_check(recs, labels)
  assert abs(check["ari_skill_answer"]) < 0.15
  assert check["noise_fraction"] == pytest.approx(np.mean(labels < 0))


def test_combine_drops_zero_weights_and_scales_each_block():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0, 100, (50, 8)), rng.normal(0, 0.01, (50, 3))
  z = clusters.combine([a, b], [1.0, 0.5], dims=4)
  assert z.shape == (50, 4 + 3)
  assert np.mean(np.sum(z[:, :4] ** 2, 1)) == pytest.approx(1.0, rel=1e-4)
  assert np.mean(np.sum(z[:, 4:] ** 2, 1)) == pytest.approx(0.25, rel=1e-4)
  assert clusters.combine([a, b], [0.0, 1.0], dims=4).shape == (50, 3)
  with pytest.raises(ValueError, match="weight 0"):
    clusters.combine([a], [0.0], dims=2)


def _ask_by(fn):
  """A scripted reference consensus: fn(record image marker, question) -> answer."""
  def ask(images, questions):
    return [fn(int(im[0, 0, 0]), q) for im, q in zip(images, questions)]
  return ask


def _marked(n, mark, start=0, **kw):
  img = np.full((8, 8, 3), mark, np.uint8)
  return [_rec(start + i, "", "x", ("t_small",), image=img, **kw) for i in range(n)]


def test_validation_keeps_a_separating_name_and_rejects_one_that_does_not():
  members, non = _marked(20, 1), _marked(40, 2, start=100)
  ask = _ask_by(lambda mark, q: "yes" if (mark == 1 or "everything" in q) else "no")
  good = clusters.Candidate("ones", "is it one?", ("yes",), "test")
  bad = clusters.Candidate("everything", "is it everything?", ("yes",), "test")
  v = clusters.validate(good, ask, members, non)
  assert v.kept and v.member_rate == 1.0 and v.nonmember_rate == 0.0
  v = clusters.validate(bad, ask, members, non)
  assert not v.kept and v.member_rate == v.nonmember_rate == 1.0
  # A small difference on few rows is not enough either (intervals overlap).
  few = clusters.validate(good, _ask_by(lambda m, q: "yes" if m == 1 else "no"),
                          members[:2], non[:2])
  assert not few.kept


def test_name_type_falls_back_to_a_descriptive_name_marked_as_such():
  members = [_rec(i, "", "purple", ("t_small",), question="what colour is the circle?")
             for i in range(12)]
  others = [_rec(100 + i, "", "2", (), question="how many squares are there?")
            for i in range(30)]
  everyone = members + others
  noisy = lambda shown: [clusters.Candidate("purple things", "is it purple?", ("yes",), "fake")]
  ask = _ask_by(lambda mark, q: "yes")                   # answers yes to everything
  info = clusters.name_type(members[:4], members[4:], others, everyone, [noisy], ask, 0.3)
  assert info["named_by"] == clusters.DESCRIPTIVE
  assert info["name"] == info["descriptive"]
  assert info["name"].startswith("what colour is circle ->") and "purple (100%)" in info["name"]
  assert info["candidates"][0]["kept"] is False
  # The same candidate validates when the references do tell them apart.
  ask = _ask_by(lambda mark, q: "yes" if mark == 9 else "no")
  members = [dict(r, image=np.full((8, 8, 3), 9, np.uint8)) for r in members]
  info = clusters.name_type(members[:4], members[4:], others, everyone, [noisy], ask, 0.3)
  assert info["name"] == "purple things" and info["named_by"] == "fake"


def test_candidate_probe_fills_the_records_question_literally():
  c = clusters.Candidate("{weird} name", 'is "{question}" about {weird}?', ("yes",), "x")
  assert c.probe({"question": "how many?"}) == 'is "how many?" about {weird}?'


class _FakeAuditing:
  """Stands in for rollout.Auditing: the auditor writes one fixed question."""

  def __init__(self, question="how many objects are there?"):
    self.question = question
    self.references = ["ref_a", "ref_b"]
    self.rcfg = types.SimpleNamespace(consensus="majority")
    self.answerers = {"ref_a": None, "ref_b": None, "t_small": None}
    self.runs = []

  def run(self, seeds, pairings, rng, num_samples=None):
    n = len(seeds) * num_samples
    self.runs.append(n)
    return types.SimpleNamespace(question=[self.question] * n, valid=np.ones(n, bool))

  def answer(self, images, questions):
    assert set(self.answerers) == {"ref_a", "ref_b"}   # only the references are asked
    ans = ["5" if im[0, 0, 0] == 1 else "2" for im in images]
    return {r: ans for r in self.answerers}


def test_question_namer_and_references_ask_on_a_scripted_round():
  aud = _FakeAuditing()
  ask = clusters.references_ask(aud)
  assert "t_small" in aud.answerers                        # the round itself is untouched
  namer = clusters.question_namer(aud, ask, samples=2)
  members, non = _marked(12, 1), _marked(30, 2, start=100)
  cands = namer(members[:4])
  assert aud.runs == [8]
  assert cands == [clusters.Candidate('"how many objects are there?" -> 5',
                                      "how many objects are there?", ("5",),
                                      "auditor:question")]
  assert clusters.validate(cands[0], ask, members[4:], non).kept


def test_chat_namer_decodes_and_cleans_names():
  tok = types.SimpleNamespace(prompt=lambda text: [1, 2, 3],
                              decode=lambda ids: {7: '"Counting crowded scenes."\nmore'}[ids[0]])
  out = types.SimpleNamespace(rows=lambda: [[7, 99, 5], [7, 99]])
  sampler = types.SimpleNamespace(sample=lambda *a, **k: out)
  sp1 = SamplingParams(max_new_tokens=8, temperature=1.0)
  aud = types.SimpleNamespace(tok=tok, stops={99}, sp1=sp1, auditor=sampler)
  namer = clusters.chat_namer(aud, samples=2)
  cands = namer(_marked(3, 1))
  assert [c.name for c in cands] == ["Counting crowded scenes"]
  assert cands[0].answers == ("yes",) and "{question}" in cands[0].question
  assert "Counting crowded scenes" in cands[0].question


def test_analyse_unlabelled_names_types_and_finds_the_planted_gaps():
  def scene_of(n, colour):
    cells = [(r, c) for r in range(3) for c in range(3)][:n]
    return Scene(tuple(Obj(r, c, "circle", colour, "large") for r, c in cells)).to_json()
  recs, xs = [], []
  rng = np.random.default_rng(0)
  spec = [("counting", "how many objects are there?", lambda j: str(5 + j % 3), 40, 10,
           lambda j: scene_of(5 + j % 3, "red")),
          ("colour", "what colour is the circle?", lambda j: "purple", 15, 5,
           lambda j: scene_of(1, "purple")),
          ("shape", "what shape is the red object?", lambda j: "circle", 6, 40,
           lambda j: scene_of(1, "red"))]
  for b, (skill, q, label, n_fail, n_ok, ctx) in enumerate(spec):
    for j in range(n_fail + n_ok):
      failed = ("t_small",) if j < n_fail else ()
      recs.append(_rec(len(recs), skill, label(j), failed, question=q, context=ctx(j)))
      centre = np.zeros(6)
      centre[2 * b] = 1.0
      xs.append(centre + rng.normal(0, 0.05, 6))
  m = {"top_k": 3, "purity": 0.5, "unlabelled": {"name_top": 2}}
  gaps = {"t_small": G.parse_gaps(["counting:n>=4", "colour:purple"]), "t_large": ()}
  labelled = {"planted_gap_recall": 1.0, "planted_gaps": {}, "failure_types": [
      {"name": "counting: 5-7", "skill": "counting", "labels": ["5", "6", "7"]},
      {"name": "colour: purple", "skill": "colour", "labels": ["purple"]},
      {"name": "shape: circle", "skill": "shape", "labels": ["circle"]}]}
  ask = _ask_by(lambda mark, q: "no")
  namer = lambda shown: [clusters.Candidate("never", "is it?", ("yes",), "fake")]
  res = clusters.analyse_unlabelled(recs, list(TARGETS), "t_small", gaps, m, np.asarray(xs),
                                    knowledge=KNOWLEDGE, namers=[namer], ask=ask,
                                    labelled=labelled)
  assert res["planted_gap_recall"] == 1.0
  assert res["planted_gaps"]["t_small"]["counting:n>=4"]["rank"] == 1
  assert res["check"]["ari_skill_answer"] < res["check"]["ari_labelled_types"] == pytest.approx(1)
  assert res["check"]["planted_gap_recall_labelled"] == 1.0
  top = res["failure_types"]
  assert top[0]["named_by"] == "descriptive" and top[0]["candidates"][0]["kept"] is False
  assert top[0]["name"].startswith("how many objects") and top[0]["size"] == 40
  assert len(top[0]["members"]) == 8 and top[0]["count"] == 40
  assert top[2]["candidates"] == []                      # beyond name_top: not asked


def test_settings_problems():
  assert clusters.problems({}) == []
  bad = clusters.problems({"dims": 0, "namers": ("oracle",), "name_margin": 2, "what": 1,
                           "image_weight": -1})
  assert any("unknown key 'what'" in p for p in bad)
  assert any("dims" in p for p in bad) and any("oracle" in p for p in bad)
  assert any("name_margin" in p for p in bad) and any("image_weight" in p for p in bad)


def test_make_type_and_score_types_match_the_labelled_grouping():
  probes = [ft.Probe(f"p{i}", "colour", "red", "", ("t_small",) if i < 3 else ())
            for i in range(6)]
  ty = ft.make_type("cluster 0", probes[:4], TARGETS, "t_small")
  ft.score_types([ty], probes, TARGETS)
  ref = ft.group(probes, TARGETS, "t_small")[0]
  assert ty.name == "cluster 0" and ty.skill == "colour"
  assert ty.rate["t_small"] == 0.75 and ty.excess["t_small"] == pytest.approx(3 - 4 * 0.5)
  assert ty.score["t_small"] == pytest.approx(ft.wilson_lower(3, 4) - 0.5)
  assert ref.score["t_small"] == pytest.approx(ft.wilson_lower(3, 6) - 0.5)
  assert ft.wilson_upper(0, 10) == pytest.approx(1 - ft.wilson_lower(10, 10))


def test_embedder_pools_the_tower_and_the_llm_and_is_batch_invariant():
  from auditdm_jax import models
  cfg = models.get_preset("tiny-gemma3")
  handle = models.VLM.random(cfg, seed=0)
  tok = types.SimpleNamespace(bos_id=2, encode=lambda t: [3 + (ord(ch) % 50) for ch in t])
  emb = clusters.Embedder(models.build(cfg), handle.params, tok, cfg.family,
                          cfg.vision.image_size, batch=4)
  rng = np.random.default_rng(0)
  s = cfg.vision.image_size
  images = rng.integers(0, 256, (5, s, s, 3), dtype=np.uint8)
  f = emb.images(images)
  assert f.shape == (5, cfg.vision.out_dim or cfg.vision.width) and np.isfinite(f).all()
  np.testing.assert_allclose(emb.images(images[3:4]), f[3:4], rtol=1e-5, atol=1e-5)
  texts = ["how many objects are there? 5", "what colour is it? red", "a", "b c", "d"]
  t = emb.texts(texts)
  assert t.shape == (5, cfg.text.width) and np.isfinite(t).all()
  np.testing.assert_allclose(emb.texts(texts[1:2]), t[1:2], rtol=1e-4, atol=1e-5)
  assert not np.allclose(t[0], t[1])
  recs = [dict(_rec(i, "", "red", ("t_small",), question=texts[i]), image=images[i])
          for i in range(5)]
  fi, ft_ = emb.probes(recs)
  assert fi.shape == f.shape and ft_.shape == t.shape


@pytest.mark.slow
def test_mine_unlabelled_end_to_end_with_tiny_random_models():
  """The stage's call (`mine_unlabelled`) on a real rollout.Auditing of tiny
  random scene models: embedding through the auditor's sampler, the auditor's
  question route as the namer, the references as validators."""
  import dataclasses
  from auditdm_jax import models
  from auditdm_jax.scenes import editor as scene_editor
  from auditdm_jax.audit import reward as R
  from auditdm_jax.audit import rollout
  from auditdm_jax.models import presets
  from auditdm_jax.sampling import Sampler
  from auditdm_jax.scenes import questions, world
  from auditdm_jax.scenes.text import AUDITOR_TASKS, world_tokenizer
  ptok, atok = world_tokenizer("paligemma"), world_tokenizer("gemma3")
  pal = presets.tiny_paligemma2(vocab_size=512, width=32, depth=1, image_size=48,
                                patch_size=16, vision_width=16, vision_depth=1,
                                sliding_window=None)
  acfg = presets.get_preset("scene-gemma3")
  acfg = dataclasses.replace(
      acfg, text=dataclasses.replace(acfg.text, width=32, depth=1, head_dim=8, mlp_dim=64,
                                     vision_proj_dim=16, scan_unroll=1),
      vision=dataclasses.replace(acfg.vision, width=16, depth=1, mlp_dim=32, scan_unroll=1))
  answerers = {n: Sampler(models.VLM.random(pal, seed=i, tokenizer=ptok))
               for i, n in enumerate(["t_small", "ref_a", "ref_b"])}
  auditing = rollout.Auditing(Sampler(models.VLM.random(acfg, seed=5, tokenizer=atok)),
                              answerers, "t_small", ["ref_a", "ref_b"],
                              scene_editor.SceneEditor(), R.RewardConfig(), num_samples=2,
                              max_new_tokens=6, tasks=AUDITOR_TASKS)
  rng = np.random.default_rng(0)
  recs = []
  for i in range(40):
    skill = ("colour", "counting")[i % 2]
    scene, q = questions.scene_for_skill(skill, rng)
    recs.append(dict(_rec(i, skill, q.answer, ("t_small",) if i % 3 else (), question=q.text,
                          context=scene.to_json()), image=world.render(scene)))
  m = {"top_k": 3, "purity": 0.5,
       "unlabelled": {"name_top": 1, "name_show": 2, "name_samples": 1, "name_candidates": 1,
                      "name_members": 4, "name_nonmembers": 4, "min_cluster_size": 3,
                      "batch": 16}}
  logs = []
  res = clusters.mine_unlabelled(recs, ["t_small"], "t_small",
                                 {"t_small": G.parse_gaps(["colour:purple"])}, m, auditing,
                                 models.build, knowledge=KNOWLEDGE, log=logs.append)
  assert res["clusters"] >= 1 and res["failure_types"]
  assert "ari_skill_answer" in res["check"] and -1 <= res["check"]["ari_skill_answer"] <= 1
  top = res["failure_types"][0]
  assert top["named_by"] in ("descriptive", "auditor:question")
  for c in top["candidates"]:
    assert c["members"] == 4 or c["members"] == len(top["members"]) - 2
  assert logs and logs[0].startswith("mine (unlabelled): ")
  assert res["embed_s"] > 0 and set(answerers) == {"t_small", "ref_a", "ref_b"}
