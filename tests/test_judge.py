"""The judge reward (`reward.mode = "judge"`): the judge's prompt and scoring
against a fake scorer, and the wiring of rollout, metrics and mining with
scripted judges (fake samplers: no model compiles, so these run by default).

A scripted judge returns a chosen p(same meaning) for each (target answer,
consensus) pair it is asked about, and records what it was asked. The
exact comparison settles the rows where the answers are equal (no judge
call); the judge decides the rest."""

import dataclasses
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from auditdm_jax.scenes import editor as scene_editor
from auditdm_jax.audit import learner, rollout
from auditdm_jax.audit import reward as R
from auditdm_jax.mine import probes
from auditdm_jax.scenes import parse, world
from auditdm_jax.scenes.text import AUDITOR_TASKS, world_tokenizer
from auditdm_jax.utils import answers

# ---------------------------------------------------------------------------
# The prompt and judge_same_prob against a fake scorer
# ---------------------------------------------------------------------------


def test_judge_prompt_spells_counts_so_the_world_tokenizer_tells_them_apart():
  tok = world_tokenizer("paligemma")
  assert answers.spoken_key("The Two.") == answers.spoken_key("2") == "two" and answers.spoken_key("red circle") == "red circle"
  assert "'two'" in R.judge_prompt("2", "Two") and "'three'" in R.judge_prompt("x", "3")
  # Digits are one unknown id in the world tokenizer: "2" vs "3" and "2" vs
  # "4" must still be different prompts.
  assert tok.encode("2") == tok.encode("3")
  assert tok.encode(R.judge_prompt("2", "3")) != tok.encode(R.judge_prompt("2", "4"))


class FakeScorer:
  """A Sampler stand-in: `score` returns log p(yes) = log p and log p(no) =
  log(1 - p) for each prompt, p chosen per (a, b) pair; records each call."""

  def __init__(self, table, image_size=16):
    self.tokenizer = world_tokenizer("paligemma")
    self.cfg = SimpleNamespace(vision=SimpleNamespace(image_size=image_size))
    self.table = {tuple(self.tokenizer.prompt(R.judge_prompt(a, b))): p
                  for (a, b), p in table.items()}
    self.calls = []

  def score(self, images, prompts, answers):
    self.calls.append((np.shape(images), len(prompts)))
    yes = self.tokenizer.answer("yes")
    out = []
    for pr, ans in zip(prompts, answers, strict=True):
      p = self.table[tuple(pr)]
      out.append(np.array([np.log(p) if list(ans) == yes else np.log1p(-p)]))
    return out


def test_judge_same_prob_reads_p_yes_against_p_no_in_fixed_batches():
  pairs = [("2", "3"), ("big", "large"), ("red", "red"), ("yes", "no"), ("4", "four"),
           ("left", "right")]
  ps = [0.1, 0.8, 0.95, 0.02, 0.7, 0.3]
  scorer = FakeScorer(dict(zip(pairs, ps)))
  images = np.zeros((6, 48, 48, 3), np.uint8)
  a, b = [x for x, _ in pairs], [y for _, y in pairs]
  got = R.ModelJudge(scorer, "fake", batch_size=4).same_prob(images, a, b)
  np.testing.assert_allclose(got, ps, rtol=1e-5)
  # Two calls of one shape: 4 pairs (the last padded), yes and no rows each,
  # the images fitted to the judge's resolution.
  assert scorer.calls == [((8, 16, 16, 3), 8)] * 2
  np.testing.assert_allclose(R.judge_same_prob(scorer, images, a, b), ps, rtol=1e-5)
  assert scorer.calls[-1] == ((12, 16, 16, 3), 12)
  assert R.judge_same_prob(scorer, images[:0], [], []).shape == (0,)


# ---------------------------------------------------------------------------
# The rollout with fake samplers and scripted judges
# ---------------------------------------------------------------------------


class FakeSampler:
  """Returns scripted texts, in order, for every row it is asked to sample."""

  def __init__(self, texts, family="paligemma", image_size=48):
    self.tokenizer = world_tokenizer("gemma3" if family == "gemma3" else "paligemma")
    self.cfg = SimpleNamespace(eos_id=self.tokenizer.eos_id, family="paligemma",
                               vision=SimpleNamespace(image_size=image_size))
    self.texts = list(texts)

  def sample(self, images, prompts, params, rng=None):
    del images, rng
    n = len(prompts) * params.num_samples
    texts = (self.texts * (1 + n // len(self.texts)))[:n]
    rows = [self.tokenizer.encode(t) + [self.tokenizer.eos_id] for t in texts]
    width = max(len(r) for r in rows)
    tokens = np.zeros((n, width), np.int32)
    for i, r in enumerate(rows):
      tokens[i, :len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    return SimpleNamespace(tokens=tokens, lengths=lengths,
                           rows=lambda: [tokens[i, :m].tolist() for i, m in enumerate(lengths)])


class ScriptedJudge:
  """p(same) = p_fn(a, b) on the normalised (target, consensus) answers."""

  name = "scripted"

  def __init__(self, p_fn):
    self.p_fn, self.asked = p_fn, []

  def same_prob(self, images, answers_a, answers_b):
    assert len(images) == len(answers_a) == len(answers_b)
    self.asked += list(zip(answers_a, answers_b))
    return np.array([self.p_fn(a, b) for a, b in zip(answers_a, answers_b)], np.float32)


Q = "how many objects are there?"
K = 2


def _scene_rows():
  """4 seeds x K = 8 rows; the truth (a count word) of each row."""
  rng = np.random.default_rng(3)
  seeds = []
  for _ in range(4):
    s = world.random_scene(rng, 2, 4)
    seeds.append(rollout.Seed(world.render(s), s.to_json(), Q))
  truth = [parse.try_answer(world.Scene.from_json(seeds[i // K].context), Q)[0].answer
           for i in range(4 * K)]
  assert all(t in ("two", "three", "four") for t in truth)
  return seeds, truth


def _auditing(rcfg, judge=None):
  """Rows (seed = row // 2):
    0 exact same (other: a different count)   4 invalid question (no '?')
    1 target wrong ("eight")                  5 target wrong ("zero")
    2 target unparseable ("blue")             6 target wrong ("eight")
    3 references split: no consensus          7 exact same (other: "zero")
  """
  seeds, truth = _scene_rows()
  texts = [Q] * 4 + ["how many objects"] + [Q] * 3
  target = list(truth)
  target[1], target[2], target[5], target[6] = "eight", "blue", "zero", "eight"
  other = list(truth)
  other[0], other[7] = "eight", "zero"
  ref_b = list(truth)
  ref_b[3] = "eight"
  answerers = {"target": FakeSampler(target), "other": FakeSampler(other),
               "ref_a": FakeSampler(truth), "ref_b": FakeSampler(ref_b)}
  auditing = rollout.Auditing(FakeSampler(texts, "gemma3"), answerers, "target",
                              ["ref_a", "ref_b"], scene_editor.SceneEditor(), rcfg,
                              num_samples=K, judge=judge,
                              tasks=AUDITOR_TASKS)
  roll = auditing.run(seeds, ["question"] * 4, jax.random.key(0))
  return auditing, roll, seeds


EXACT = [0, 1, 0, 0, -1, 1, 1, 0]


def test_exact_mode_is_the_exact_reward_and_carries_no_judge():
  _, roll, _ = _auditing(R.RewardConfig())
  np.testing.assert_array_equal(roll.valid, [1, 1, 1, 1, 0, 1, 1, 1])
  np.testing.assert_array_equal(roll.has_consensus, [1, 1, 1, 0, 0, 1, 1, 1])
  np.testing.assert_allclose(roll.reward, EXACT)
  np.testing.assert_array_equal(roll.exact_success, roll.success)
  assert roll.p_same == {} and roll.judged == {}
  # The exact mode's metrics rows keep their keys.
  assert set(learner.step_metrics(roll)) == {
      "reward", "success_rate", "consensus_rate", "invalid_rate", "unanswered_rate",
      "distinct", "top_question_share"}
  share = learner.step_metrics(roll)["top_question_share"]
  assert share == max(roll.question.count(q) for q in roll.question) / roll.n
  with pytest.raises(ValueError, match="needs a judge"):
    _auditing(R.RewardConfig(mode="judge"))


def test_always_same_judge_pays_nothing_and_finds_nothing():
  judge = ScriptedJudge(lambda a, b: 0.9)
  auditing, roll, seeds = _auditing(R.RewardConfig(mode="judge"), judge)
  np.testing.assert_allclose(roll.reward, [0, 0, 0, 0, -1, 0, 0, 0])
  assert not roll.success.any()
  np.testing.assert_allclose(roll.exact_success, np.array(EXACT) == 1)
  # Only exact disagreements under a consensus were asked: the target's
  # rows 1, 5, 6 and the other target's rows 0 and 7.
  assert sorted(judge.asked) == sorted([("8", roll.consensus[1]), ("0", roll.consensus[5]),
                                        ("8", roll.consensus[6]), ("8", roll.consensus[0]),
                                        ("0", roll.consensus[7])])
  assert all(a != b and b for a, b in judge.asked)
  np.testing.assert_array_equal(roll.judged["target"], np.array(EXACT) == 1)
  np.testing.assert_array_equal(roll.judged["other"], [1, 0, 0, 0, 0, 0, 0, 1])
  assert learner.find_rows(roll, 1, "target") == []
  recs = probes.probe_records(roll, seeds, list(range(4)), K, ["target", "other"],
                              ["ref_a", "ref_b"], "majority", auditing.editor, "aud", 0,
                              judge_threshold=0.5)
  assert [r["failed"] for r in recs] == [[]] * 6
  assert [r["failed_exact"] for r in recs] == [["other"], ["target"], [], ["target"],
                                               ["target"], ["other"]]


def test_always_different_judge_pays_every_exact_disagreement():
  """Every consensus-backed, valid, answered row whose answer differs: the
  exact reward (rows with equal answers are never asked)."""
  judge = ScriptedJudge(lambda a, b: 0.1)
  _, roll, _ = _auditing(R.RewardConfig(mode="judge"), judge)
  np.testing.assert_allclose(roll.reward, EXACT)
  np.testing.assert_array_equal(roll.success, roll.exact_success)
  fig = learner.judge_exact(roll)
  assert fig["judged"] == 3 and fig["judge_exact_disagree"] == 0.0


def test_mixed_judge_decides_reward_finds_metrics_and_mining():
  """The judge calls "0" (zero) the same as any count, everything else different."""
  judge = ScriptedJudge(lambda a, b: 0.8 if a == "0" else 0.2)
  rcfg = R.RewardConfig(mode="judge", invalid_reward=-0.5)
  auditing, roll, seeds = _auditing(rcfg, judge)
  np.testing.assert_allclose(roll.reward, [0, 1, 0, 0, -0.5, 0, 1, 0])
  np.testing.assert_allclose(roll.p_same["target"], [1, 0.2, 1, 1, 1, 0.8, 0.2, 1], rtol=1e-6)
  finds = learner.find_rows(roll, 3, "target")
  assert [f["p_same"] for f in finds] == pytest.approx([0.2, 0.2])
  row = learner.step_metrics(roll, auditing.editor, judge=True)
  assert row["success_rate"] == 2 / 8 and row["exact_success_rate"] == 3 / 8
  assert row["judged"] == 3 and row["judge_exact_disagree"] == pytest.approx(1 / 3)
  assert row["judge_same_exact_differs"] == 1 and row["judge_differs_exact_same"] == 0
  # The measurement asks the judge about the rows exact equality settled
  # too (rows 0 and 7, which this judge calls different), and reuses the
  # rollout's answers for the rest.
  n_asked = len(judge.asked)
  ag = learner.judge_agreement(auditing, [roll])
  assert judge.asked[n_asked:] == [(roll.consensus[0], roll.consensus[0]),
                                   (roll.consensus[7], roll.consensus[7])]
  assert ag["rows"] == 5 and ag["agreement"] == pytest.approx(2 / 5)
  assert ag["exact_same"] == {"rows": 2, "judge_same": 0.0}
  assert ag["exact_differs"]["rows"] == 3
  assert ag["exact_differs"]["judge_differs"] == pytest.approx(2 / 3)
  # Mining: a probe fails a target by the judge's decision; the exact one rides along.
  recs = probes.probe_records(roll, seeds, list(range(4)), K, ["target", "other"],
                              ["ref_a", "ref_b"], "majority", auditing.editor, "aud", 0,
                              judge_threshold=rcfg.judge_threshold)
  assert [r["failed"] for r in recs] == [["other"], ["target"], [], [], ["target"], []]
  assert [r["failed_exact"] for r in recs] == [["other"], ["target"], [], ["target"],
                                               ["target"], ["other"]]
  assert recs[3]["p_same"] == {"target": pytest.approx(0.8), "other": 1.0}
  for r in recs:   # the exact decision is recomputed from what the store keeps
    assert probes.exact_failed(r, ["target", "other"], auditing.editor) == r["failed_exact"]
  summary = probes.judge_summary(recs, ["target", "other"], auditing.editor)
  assert summary["target"] == {"exemplars_exact": 3, "exemplars_judge": 2,
                               "judge_exact_disagree": pytest.approx(1 / 3),
                               "judge_same_exact_differs": 1, "judge_differs_exact_same": 0}
  assert summary["other"]["exemplars_exact"] == 2 and summary["other"]["exemplars_judge"] == 1
  # Exact-mode records of the same rollout: failed is the exact decision.
  plain = probes.probe_records(roll, seeds, list(range(4)), K, ["target", "other"],
                               ["ref_a", "ref_b"], "majority", auditing.editor, "aud", 0)
  assert [r["failed"] for r in plain] == [r["failed_exact"] for r in plain]
  # Merged rollouts (the held-out evaluation) keep the judge's arrays.
  merged = learner.merge_rollouts([roll, roll], [8, 3])
  np.testing.assert_allclose(merged.p_same["target"],
                             np.concatenate([roll.p_same["target"], roll.p_same["target"][:3]]))
  assert merged.judged["other"].dtype == bool and merged.exact_success.shape == (11,)


def test_judge_agreement_on_the_seeds_own_questions():
  seeds, truth = _scene_rows()
  truth = truth[::K]                                  # one row per seed
  src = [{"image": sd.image, "scene": sd.context, "question": sd.question} for sd in seeds]
  target = list(truth)
  target[1] = "eight"
  answerers = {"target": FakeSampler(target), "ref_a": FakeSampler(truth),
               "ref_b": FakeSampler(truth)}
  judge = ScriptedJudge(lambda a, b: 0.9)             # always "the same"
  auditing = rollout.Auditing(FakeSampler([Q], "gemma3"), answerers, "target",
                              ["ref_a", "ref_b"], scene_editor.SceneEditor(),
                              R.RewardConfig(mode="judge"), num_samples=K, judge=judge,
                              tasks=AUDITOR_TASKS)
  ag = learner.judge_agreement_on_seeds(auditing, learner.SeedPool(src), 4, 4)
  assert ag == {"agreement": 0.75, "rows": 4, "exact_same": {"rows": 3, "judge_same": 1.0},
                "exact_differs": {"rows": 1, "judge_differs": 0.0}}
  assert len(judge.asked) == 4                        # every row, equal answers too
  # A padded last call: its extra rows are not counted.
  ag = learner.judge_agreement_on_seeds(auditing, learner.SeedPool(src), 3, 4)
  assert ag["rows"] == 3 and ag["exact_differs"]["rows"] == 1


def test_judge_threshold_moves_the_decision():
  judge = ScriptedJudge(lambda a, b: 0.6)
  _, roll, _ = _auditing(dataclasses.replace(R.RewardConfig(mode="judge"),
                                             judge_threshold=0.7), judge)
  np.testing.assert_allclose(roll.reward, EXACT)     # 0.6 < 0.7: different
  _, roll, _ = _auditing(R.RewardConfig(mode="judge"), ScriptedJudge(lambda a, b: 0.6))
  assert not roll.success.any()                      # 0.6 >= 0.5: the same


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def test_config_check_accepts_loaded_judges_and_names_a_bad_one():
  from configs import tiny
  from auditdm_jax.stages import audit as audit_stage
  c = tiny.get_config("smoke")
  c.audit.reward.mode = "judge"
  assert not [p for p in audit_stage.problems(c) if "judge" in p or "reward" in p]
  assert R.judge_name(R.RewardConfig(**dict(c.audit.reward)), ["ref_a", "ref_b"]) == "ref_a"
  c.audit.reward.judge = "target_large"          # any model of the run may judge
  assert not [p for p in audit_stage.problems(c) if "judge" in p]
  c.audit.reward.judge = "gpt-9"
  bad = [p for p in audit_stage.problems(c) if "judge" in p]
  assert len(bad) == 1 and "'gpt-9' is not a model of this config" in bad[0], bad
  c.audit.reward.mode = "exact"                  # the judge is only checked in judge mode
  assert not [p for p in audit_stage.problems(c) if "judge" in p]
  with pytest.raises(ValueError, match="judge_batch"):
    R.RewardConfig(mode="judge", judge_batch=0)


# ---------------------------------------------------------------------------
# A reference that learns to judge (tiny.py:judge)
# ---------------------------------------------------------------------------


def _scene_records(n):
  from auditdm_jax.scenes import gaps as gaps_lib
  skills = list(gaps_lib.SKILL_ANSWERS)
  return [dict(index=i, question=f"question {i}", skill=skills[i % len(skills)],
               answer=gaps_lib.SKILL_ANSWERS[skills[i % len(skills)]][i % 2])
          for i in range(n)]


def test_judge_rows_are_the_rewards_question_balanced_and_fixed_per_record():
  from auditdm_jax.scenes import gaps as gaps_lib
  from auditdm_jax.scenes import tasks
  recs = _scene_records(2000)
  rows = [tasks.judge_row(r, 0.2, R.judge_prompt) for r in recs]
  assert rows == [tasks.judge_row(r, 0.2, R.judge_prompt) for r in recs]   # fixed per record
  picked = [(r, x) for r, x in zip(recs, rows) if x is not None]
  assert 0.17 < len(picked) / len(recs) < 0.23
  labels = [x[1] for _, x in picked]
  assert set(labels) == {"yes", "no"} and 0.4 < labels.count("yes") / len(labels) < 0.6
  for r, (prompt, label) in picked:
    space = gaps_lib.SKILL_ANSWERS[r["skill"]]
    pairs = [(a, b) for a in space for b in space if R.judge_prompt(a, b) == prompt]
    assert pairs, prompt                        # the reward's own prompt, of two answers
    assert all(r["answer"] in (a, b) and (label == "yes") == (a == b) for a, b in pairs)
  assert all(tasks.judge_row(r, 0.0, R.judge_prompt) is None for r in recs[:50])


def test_every_judge_row_fits_the_judges_row_length():
  from auditdm_jax.scenes import gaps as gaps_lib
  from auditdm_jax.stages.pretrain import JUDGE_SEQ_LEN
  tok = world_tokenizer("paligemma")
  longest = max(len(tok.prompt(R.judge_prompt(a, b))) + len(tok.answer(y))
                for space in gaps_lib.SKILL_ANSWERS.values() for a in space for b in space
                for y in ("yes", "no"))
  assert longest <= JUDGE_SEQ_LEN, longest


def test_vqa_task_with_a_judge_rate_trains_yes_no_rows():
  from auditdm_jax.models import presets
  from auditdm_jax.scenes import tasks
  cfg = presets.get_preset("scene-paligemma2-large")
  tok = world_tokenizer("paligemma")
  task = tasks.VQATask(cfg, tok, 32, judge_rate=0.5, judge_prompt=R.judge_prompt)
  plain = tasks.VQATask(cfg, tok, 32)
  image = np.zeros((48, 48, 3), np.uint8)
  differ = 0
  for r in _scene_records(40):
    r = dict(r, image=image)
    judged = tasks.judge_row(r, 0.5, R.judge_prompt)
    row, base = task(r), plain(r)
    if judged is None:
      np.testing.assert_array_equal(row["tokens"], base["tokens"])
    else:
      want = task.row(image, *judged)
      np.testing.assert_array_equal(row["tokens"], want["tokens"])
      differ += 1
  assert differ > 0
  with pytest.raises(ValueError, match="judge_prompt"):
    tasks.VQATask(cfg, tok, 32, judge_rate=0.2)
  with pytest.raises(ValueError, match="judge_rate"):
    tasks.VQATask(cfg, tok, 32, judge_rate=1.0, judge_prompt=R.judge_prompt)


def test_judge_variant_and_the_judge_rate_check():
  from configs import tiny
  from auditdm_jax import config_check
  c = tiny.get_config("judge")
  assert c.audit.reward.mode == "judge" and c.models.ref_a.judge_rate == 0.2
  assert "judge_rate" not in c.models.target_small
  config_check.check(c, check_inputs=False)
  c.models.auditor.judge_rate = 0.1
  c.models.ref_b.judge_rate = 1.5
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check(c, check_inputs=False)
  assert "models.ref_b.judge_rate must be a number in [0, 1), got 1.5" in str(e.value)
  assert "models.auditor.judge_rate: only targets and references" in str(e.value)


@pytest.mark.slow
def test_model_judge_through_a_sampler_is_batch_invariant():
  """A tiny random PaliGemma as the judge, through the sharded Sampler: one
  compile for fixed batches, and the same p_same whatever the batch size."""
  from auditdm_jax import models
  from auditdm_jax.models import presets
  from auditdm_jax.sampling import Sampler
  pal = presets.tiny_paligemma2(vocab_size=512, width=32, depth=1, image_size=32,
                                patch_size=16, vision_width=16, vision_depth=1,
                                sliding_window=None)
  sampler = Sampler(models.VLM.random(pal, seed=0, tokenizer=world_tokenizer("paligemma")))
  images = np.random.default_rng(0).integers(0, 255, (5, 48, 48, 3), dtype=np.uint8)
  a, b = ["2", "3", "red", "yes", "left"], ["3", "3", "blue", "no", "left"]
  p4 = R.ModelJudge(sampler, "tiny", batch_size=4).same_prob(images, a, b)
  before = sampler.num_compiles
  p4_again = R.ModelJudge(sampler, "tiny", batch_size=4).same_prob(images[::-1], a[::-1], b[::-1])
  assert sampler.num_compiles == before          # fixed shape: no new compile
  p_all = R.judge_same_prob(sampler, images, a, b)
  np.testing.assert_allclose(p4, p_all, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p4_again[::-1], p4, rtol=1e-5, atol=1e-6)
  assert ((p4 > 0) & (p4 < 1)).all()
  # "2" vs "3" and "3" vs "3" are different prompts, so different p_same.
  assert p4[0] != p4[1]
