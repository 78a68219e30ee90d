"""audit.diversity: descriptor-conditioned GRPO, its archive and journal, and the
diversity figures (docs/audit.md "Diversity")."""

import collections
import json

import jax
import numpy as np
import pytest

from auditdm_jax.audit import diversity as D
from auditdm_jax.scenes import editor as scene_editor
from auditdm_jax.scenes.text import AUDITOR_TASKS
from auditdm_jax.audit import reward as R
from auditdm_jax.audit import rollout
from auditdm_jax.sampling import Sampler
from tests.test_audit import _seeds, tiny_models  # noqa: F401  (fixture)

DESC = ("colour", "shape", "counting", "existence", "position")


def cfg(**kw):
  return D.DiversityConfig(**{"mode": "descriptors", "descriptors": DESC, **kw})


@pytest.mark.parametrize("bad, match", [
    (dict(mode="novelty"), "mode must be one of"),
    (dict(descriptors=()), "needs a non-empty"),
    (dict(descriptors=("a", "a")), "repeats"),
    (dict(descriptors=("a", " ")), "non-empty strings"),
    (dict(descriptors="counting"), "list of non-empty strings"),
    (dict(prompt="ask about it"), "must contain"),
    (dict(generic=1.0), "generic must be in"),
    (dict(elites=0), "elites must be"),
])
def test_config_names_the_problem(bad, match):
  with pytest.raises(ValueError, match=match):
    cfg(**bad)


def test_config_from_section_rejects_unknown_keys():
  assert D.DiversityConfig.from_config(None).mode == "none"
  c = D.DiversityConfig.from_config({"mode": "descriptors", "descriptors": ["a", "b"]})
  assert c.descriptors == ("a", "b") and c.on
  with pytest.raises(ValueError, match="unknown keys \\['novelty'\\]"):
    D.DiversityConfig.from_config({"novelty": 1})
  assert D.check_section({"mode": "x"}) and not D.check_section({})


def test_assign_is_stratified_over_any_window():
  c = cfg()
  rng = np.random.default_rng(0)
  seen = collections.Counter()
  for step in range(4):           # 4 steps of 5 groups: every descriptor 4 times
    got = D.assign(c, 5, step * 5, rng)
    assert sorted(got) == sorted(DESC)
    seen.update(got)
  assert set(seen.values()) == {4}
  assert D.assign(D.DiversityConfig(), 3, 0, rng) == ["", "", ""]
  # 8 groups over 5 descriptors: each 1 or 2 times
  assert set(collections.Counter(D.assign(c, 8, 3, rng)).values()) <= {1, 2}
  # generic: about that share of the groups use the generic prompt
  many = D.assign(cfg(generic=0.25), 4000, 0, rng)
  assert 0.22 < many.count("") / 4000 < 0.28


def test_spread_gives_every_seed_every_descriptor():
  groups, descs, k = D.spread(cfg(), 3, 5)
  assert k == 1 and groups == [0] * 5 + [1] * 5 + [2] * 5
  for s in range(3):
    assert sorted(descs[5 * s:5 * s + 5]) == sorted(DESC)
  groups, descs, k = D.spread(cfg(), 2, 10)        # 10 samples over 5: 2 each
  assert k == 2 and len(groups) == 10
  with pytest.raises(ValueError, match="multiple of the 5 descriptor groups"):
    D.spread(cfg(), 2, 8)
  # more descriptors than samples: the walk moves on with the seed
  groups, descs, k = D.spread(cfg(generic=0.1), 3, 2)   # 6 slots (+ generic), 2 a seed
  assert k == 1 and descs == ["colour", "shape", "counting", "existence", "position", ""]
  assert D.spread(D.DiversityConfig(), 4, 8) == ([0, 1, 2, 3], [""] * 4, 8)


def test_archive_keeps_counts_and_elites():
  a = D.Archive(cfg(elites=2))
  a.update(["counting", "counting", "colour", "counting"],
           ["how many?", "how many?", "what colour?", "how many circles?"],
           [True, True, False, True], ["question", "edit_question", "question", "question"])
  a.update(["counting"], ["how many squares?"], [True], ["question"])
  s = a.state()
  assert s["tries"] == {"colour": 1, "counting": 4}
  assert s["successes"] == {"colour": 0, "counting": 4}
  assert s["cells"] == {"edit_question|counting": {"tries": 1, "successes": 1},
                        "question|colour": {"tries": 1, "successes": 0},
                        "question|counting": {"tries": 3, "successes": 3}}
  with pytest.raises(ValueError):      # one pairing per probe
    a.update(["counting"], ["q"], [True], [])
  assert s["elites"]["counting"][0] == ["how many?", 2] and len(s["elites"]["counting"]) == 2
  assert s["elites"]["colour"] == []


def test_journal_resume_rebuilds_the_archive_of_the_checkpoint_step(tmp_path):
  path = str(tmp_path / "diversity.jsonl")
  j = D.Journal(cfg(), path)
  rows = [(1, ["counting", "colour"], ["q1", "q2"], [True, False], ["question", "question"]),
          (2, ["shape", ""], ["q3", "q1"], [True, True], ["edit_question", "edit"]),
          (3, ["position", "position"], ["q4", "q5"], [False, True], ["question"] * 2)]
  for r in rows:
    j.record(*r)
  at2 = D.Archive(cfg())
  for r in rows[:2]:
    at2.update(*r[1:])
  again = D.Journal(cfg(), path)
  again.resume(2)
  assert again.archive.state() == at2.state()
  assert [json.loads(line)["step"] for line in open(path)] == [1, 2]   # step 3 dropped
  with open(path, "a") as f:
    f.write("{not json\n")
  with pytest.raises(ValueError, match="corrupt line"):
    D.Journal(cfg(), path).resume(5)
  # a journal of an older version (no pairings) is refused by name, not misread
  old = str(tmp_path / "old.jsonl")
  with open(old, "w") as f:
    f.write(json.dumps({"step": 1, "descriptors": ["colour"], "questions": ["q"],
                        "success": [True]}) + "\n")
  with pytest.raises(ValueError, match="without its pairings"):
    D.Journal(cfg(), old).resume(1)


def test_diversity_figures_by_hand():
  qs = ["how many objects are there?"] * 3 + ["what colour is the red circle?",
                                              "what colour is the blue square?"]
  fig = D.diversity_figures(qs, [True, True, True, True, False],
                            ["counting:4", "counting:4", "counting:4", "colour:red", "x"])
  assert fig["top_question"] == "how many objects are there?"
  assert fig["top_question_share"] == pytest.approx(0.6)
  assert fig["distinct_questions"] == 3
  # templates: "how many/5" x3, "what colour/6" x2
  p = np.array([0.6, 0.4])
  assert fig["template_entropy"] == pytest.approx(float(-(p * np.log2(p)).sum()))
  assert fig["failure_categories"] == 1        # counting:4 (3 failures); colour:red has 1
  assert D.question_template("Is there a red circle?") == "is there/5"
  assert D.describe(fig) == ("top question 'how many objects are there?' 0.600 of 5, 3 "
                             "distinct, template entropy 0.97 bits, 1 failure categories")
  assert D.per_seed_success([False, True, False, False], [0, 0, 1, 1]) == 0.5


def test_auditor_task_names_the_skill_in_the_descriptor_share():
  from auditdm_jax.models import presets
  from auditdm_jax.scenes import questions as Q
  from auditdm_jax.scenes import world
  from auditdm_jax.scenes.text import SKILL_DESCRIPTORS, question_prompt, world_tokenizer
  from auditdm_jax.scenes import tasks
  acfg = presets.get_preset("scene-gemma3")
  tok = world_tokenizer("gemma3")
  rng = np.random.default_rng(1)
  recs = []
  for i in range(0, 60, 3):
    skill = Q.SKILLS[(i // 3) % len(Q.SKILLS)]
    scene, q = Q.scene_for_skill(skill, rng)
    recs.append({"index": i, "image": world.render(scene), "scene": scene.to_json(),
                 "question": q.text, "answer": q.answer, "skill": skill})
  task = tasks.AuditorTask(acfg, tok, seq_len=112, seed=0, descriptor_rate=0.5,
                           routes=("question",))
  prompts = collections.Counter()
  for r in recs:
    row = task(r)
    text = tok.decode(row["tokens"][~row["mask_ar"].astype(bool)
                                    & (row["tokens"] != acfg.image_token_id)])
    named = question_prompt(SKILL_DESCRIPTORS[r["skill"]])
    generic = question_prompt("")
    assert (named in text) != (generic in text), text
    prompts[named in text] += 1
  assert prompts[True] > 3 and prompts[False] > 3
  with pytest.raises(ValueError, match="descriptor_rate"):
    tasks.AuditorTask(acfg, tok, seq_len=112, descriptor_rate=1.5)


@pytest.mark.slow
def test_rollout_asks_each_seed_through_its_descriptor(tiny_models):  # noqa: F811
  auditor, answerers = tiny_models
  auditing = rollout.Auditing(Sampler(auditor), {n: Sampler(m) for n, m in answerers.items()},
                              "target", ["ref_a", "ref_b"], scene_editor.SceneEditor(),
                              R.RewardConfig(), num_samples=2, max_new_tokens=6,
                              diversity=cfg(), tasks=AUDITOR_TASKS)
  tok = auditor.tokenizer
  roll = auditing.run(_seeds(3), ["question", "edit", "edit_question"], jax.random.key(0),
                      descriptors=["counting", "shape", "position"])
  assert roll.descriptor == ["counting"] * 2 + [""] * 2 + ["position"] * 2
  assert roll.prompts[0][0] == tok.prompt("ask a question about counting")
  assert roll.prompts[2][0] == tok.prompt("write an edit command for the image")
  assert roll.prompts[4][1] == tok.prompt("ask a question about position")
  with pytest.raises(ValueError, match="descriptors"):
    auditing.run(_seeds(2), ["question"] * 2, jax.random.key(0), descriptors=["a"])


class _FakeJudge:
  """A sampler whose likelihood prefers, for completion [c], the prompt of
  descriptor DESC[c]."""

  def __init__(self):
    from auditdm_jax.scenes.text import world_tokenizer
    self.tokenizer = world_tokenizer("gemma3")
    self.calls = []

  def score(self, images, prompts, answers):
    self.calls.append(len(prompts))
    want = {tuple(self.tokenizer.prompt(f"ask a question about {d}")): j
            for j, d in enumerate(DESC)}
    return [np.array([0.0 if want[tuple(p)] == a[0] else -5.0, -1.0])
            for p, a in zip(prompts, answers)]


def test_adherence_pays_only_probes_that_read_as_their_descriptor():
  judge = _FakeJudge()
  adh = D.Adherence(judge, cfg(), "ask a question about the image", batch=7)
  n = 5
  img = np.zeros((8, 8, 3), np.uint8)
  roll = rollout.Rollout(
      pairings=["question"] * n, texts=[["q"]] * n,
      tokens=[[[2, 1]], [[0, 1]], [[4, 1]], [[1, 1]], [[3, 1]]],
      prompts=[[[]]] * n, images_in=[[img]] * n, question=["q"] * n,
      image=np.zeros((n, 8, 8, 3), np.uint8), context=[None] * n,
      valid=np.array([True, True, True, False, True]), reason=[""] * n, factor=[""] * n,
      answers={}, parsed={}, reward=np.array([1, 1, 0, -1, 1], np.float32),
      has_consensus=np.ones(n, bool), success=np.array([1, 1, 0, 0, 1], bool),
      consensus=[""] * n, answered=np.ones(n, bool),
      descriptor=["counting", "shape", "position", "colour", ""])
  ok = adh(roll)
  # row 0 reads as counting (DESC[2]); row 1 as colour, not shape; row 2 as
  # position; row 3 is invalid and row 4 generic: not judged
  np.testing.assert_array_equal(ok, [True, False, True, True, True])
  assert judge.calls == [7, 7, 7]           # 3 rows x 5 descriptors, padded to 7s
  reward, paid = D.apply_adherence(roll.reward, roll.success, ok, -1.0)
  np.testing.assert_array_equal(reward, [1, -1, 0, -1, 1])
  np.testing.assert_array_equal(paid, [True, False, False, False, True])
  with pytest.raises(ValueError, match="adherence must be one of"):
    cfg(adherence="judge")


def test_archive_weights_and_weighted_draws():
  a = D.Archive(cfg())
  a.update(["counting"] * 8 + ["colour"] * 8 + [""] * 4, ["q"] * 20,
           [True] * 6 + [False] * 2 + [False] * 8 + [True] * 4,
           ["question"] * 6 + ["edit_question"] * 2 + ["question"] * 8 + ["edit"] * 4)
  mixture = {"question": 0.5, "edit_question": 0.25, "edit": 0.25}
  asks = {"question": True, "edit_question": True, "edit": False}
  w = D.archive_weights(cfg(), a, mixture, asks)
  # every cell the mixture can draw: 2 question pairings x 5 descriptors + the edit alone
  assert len(w) == 11 and set(w) >= {"question|counting", "edit|"}
  assert w["question|counting"] == pytest.approx(7 / 8)
  assert w["edit_question|counting"] == pytest.approx(1 / 4)
  assert w["question|colour"] == pytest.approx(1 / 10) and w["edit|"] == pytest.approx(5 / 6)
  assert w["question|shape"] == pytest.approx(1 / 2)       # never tried: the prior mean
  # a pairing out of the mixture has no cell; the generic prompt one when generic > 0
  w2 = D.archive_weights(cfg(generic=0.1), a, {"question": 1.0, "edit": 0.0}, asks)
  assert sorted(w2) == sorted(["question|" + d for d in DESC] + ["question|"])
  assert D.split_cell("edit|") == ("edit", "") and D.split_cell("question|a|b") == (
      "question", "a|b")
  with pytest.raises(ValueError, match="not an archive cell"):
    D.split_cell("counting")
  got = collections.Counter(D.draw_weighted({"a": 3.0, "b": 1.0}, 8, np.random.default_rng(0)))
  assert got == {"a": 6, "b": 2}
  with pytest.raises(ValueError, match="weights must be finite"):
    D.draw_weighted({"a": 0.0}, 4, np.random.default_rng(0))
  with pytest.raises(ValueError, match="search must be one of"):
    cfg(search="greedy")


def test_thompson_weights_are_the_probability_a_cell_pays_best():
  p = D.best_cell_probability({"a": (60, 100), "b": (40, 100), "c": (0, 0)})
  assert sum(p.values()) == pytest.approx(1.0)
  assert p["b"] < 0.01                            # 0.4 vs 0.6 over 100 tries each
  # an untried cell (Beta(1, 1)) beats a 0.6 cell with probability ~0.4: it gets tried
  assert p["a"] == pytest.approx(0.6, abs=0.04) and p["c"] == pytest.approx(0.4, abs=0.04)
  assert p == D.best_cell_probability({"a": (60, 100), "b": (40, 100), "c": (0, 0)})
  even = D.best_cell_probability({"a": (1, 2), "b": (1, 2)})
  assert abs(even["a"] - 0.5) < 0.05
  with pytest.raises(ValueError, match="0 <= successes <= tries"):
    D.best_cell_probability({"a": (3, 2)})
  a = D.Archive(cfg(search="thompson"))
  a.update(["counting"] * 8 + ["colour"] * 8, ["q"] * 16, [True] * 8 + [False] * 8,
           ["question"] * 16)
  w = D.archive_weights(cfg(search="thompson"), a, {"question": 1.0}, {"question": True})
  assert max(w, key=w.get) == "question|counting" and w["question|colour"] < 0.01


def test_the_pairings_and_the_descriptors_draw_alike():
  # one systematic draw (utils/draws.py) behind both: same weights, same rng, same labels
  w = {"edit": 0.25, "edit_question": 0.25, "question": 0.5}
  a = rollout.draw_pairings(w, 16, np.random.default_rng(7))
  b = D.draw_weighted(w, 16, np.random.default_rng(7))
  assert a == b and collections.Counter(a) == {"question": 8, "edit": 4, "edit_question": 4}


def test_search_draws_cells_by_weight_and_evenly_without():
  from auditdm_jax.audit import learner
  mixture = {"question": 0.5, "edit_question": 0.25, "edit": 0.25}
  w = {"question|counting": 3.0, "edit_question|colour": 1.0, "edit|": 0.0}
  p, d = learner.search_draws(cfg(), mixture, 8, np.random.default_rng(0), w)
  assert collections.Counter(zip(p, d)) == {("question", "counting"): 6,
                                            ("edit_question", "colour"): 2}
  # without weights: the mixture's pairings, the descriptors walked evenly
  p, d = learner.search_draws(cfg(), mixture, 20, np.random.default_rng(0))
  assert collections.Counter(p) == {"question": 10, "edit_question": 5, "edit": 5}
  assert collections.Counter(d) == {x: 4 for x in DESC}
  with pytest.raises(ValueError, match="unknown pairings"):
    learner.search_draws(cfg(), mixture, 4, np.random.default_rng(0), {"teleport|x": 1.0})
