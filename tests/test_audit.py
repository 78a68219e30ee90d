"""The auditor's RL pieces: the disagreement reward, GRPO advantages and loss
against hand-computed values, the scene editor, one rollout with tiny random
models, and a toy policy that learns to raise its reward."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from auditdm_jax import models
from auditdm_jax.scenes import editor as scene_editor
from auditdm_jax.pipeline import editing
from auditdm_jax.audit import grpo, rollout
from auditdm_jax.audit import reward as R
from auditdm_jax.models import presets
from auditdm_jax.sampling import Sampler, SamplingParams
from auditdm_jax.scenes import world
from auditdm_jax.scenes.text import AUDITOR_TASKS, world_tokenizer
from auditdm_jax.scenes.world import Obj, Scene
from auditdm_jax.train import sft
from auditdm_jax.train.optim import path_str
from auditdm_jax.utils.answers import answer_key

# ---------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------

WORDS = {"red": 1, "blue": 2, "two": 3, "2": 3, "yes": 4, "no": 5, "big": 6, "dog": 7, "cat": 8}


def enc(text):
  return [WORDS[w] for w in text.split()]


def ids(answers, length=3):
  return R.encode_answers(answers, enc, length)


@pytest.mark.parametrize("rule", ["majority", "unanimous"])
def test_reward_on_hand_built_answer_sets(rule):
  # rows: refs agree & target differs | refs agree & target same | refs split
  #       (2 refs: a tie) | one ref empty | target empty | invalid output
  refs = [["red", "red", "red", "red", "blue", "blue"],
          ["red", "red", "blue", "", "blue", "blue"]]
  target = ["blue", "red", "red", "blue", "", "red"]
  valid = np.array([1, 1, 1, 1, 1, 0], bool)
  reward, has, disagree = R.disagreement_reward(
      ids(target), np.stack([ids(r) for r in refs]), valid, -0.5, rule=rule)
  # With 2 references "majority" (> half) and "unanimous" coincide; one
  # empty answer abstains, which breaks both.
  np.testing.assert_array_equal(np.asarray(has), [1, 1, 0, 0, 1, 0])
  # An empty target answer is no answer, never a disagreement.
  np.testing.assert_array_equal(np.asarray(disagree), [1, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(np.asarray(reward), [1, 0, 0, 0, 0, -0.5])


def test_majority_and_unanimous_differ_with_three_references():
  refs = np.stack([ids(["red", "red", "red", "red"]), ids(["red", "blue", "blue", ""]),
                   ids(["blue", "blue", "dog", ""])])
  target = ids(["blue", "red", "red", "red"])
  valid = np.ones(4, bool)
  r_maj, has_maj, _ = R.disagreement_reward(target, refs, valid, -1.0, rule="majority")
  r_una, has_una, _ = R.disagreement_reward(target, refs, valid, -1.0, rule="unanimous")
  # row 0: red/red/blue -> majority red, target blue differs; no unanimity
  # row 1: red/blue/blue -> majority blue, target red differs
  # row 2: red/blue/dog -> no majority (1 vote each)
  # row 3: red/""/"" -> one vote of three is no majority
  np.testing.assert_array_equal(np.asarray(has_maj), [1, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(r_maj), [1, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(has_una), [0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(r_una), [0, 0, 0, 0])


def test_four_references_tie_gives_no_consensus():
  refs = np.stack([ids(["red"]), ids(["red"]), ids(["blue"]), ids(["blue"])])
  _, has, _ = R.disagreement_reward(ids(["dog"]), refs, np.ones(1, bool), -1.0)
  assert not bool(has[0])


def test_consensus_text_matches_the_jitted_rule():
  rng = np.random.default_rng(0)
  vocab = ["red", "blue", "two", ""]
  for rule in R.CONSENSUS_RULES:
    refs = [[vocab[i] for i in rng.integers(0, 4, 50)] for _ in range(3)]
    text, has_t = rollout.consensus_text(refs, rule)
    cons, has = R.consensus(np.stack([ids(r) for r in refs]), rule)
    np.testing.assert_array_equal(has_t, np.asarray(has))
    for i in np.nonzero(has_t)[0]:
      assert enc(text[i]) == [int(x) for x in np.asarray(cons)[i] if x]


def test_answers_are_normalised_before_comparison():
  refs = np.stack([ids(["the two."]), ids(["2"])])
  reward, has, _ = R.disagreement_reward(ids(["Two"]), refs, np.ones(1, bool), -1.0)
  assert bool(has[0]) and float(reward[0]) == 0.0


def test_byte_encoding_tells_every_count_apart():
  """The defect that made counting gaps unfindable: normalised counts are
  digits, which the world tokenizer maps to one unknown id, so "5" == "6".
  The reward encodes bytes, whatever the tokenizer."""
  tok = world_tokenizer("paligemma")
  assert tok.encode("5") == tok.encode("6")          # why a tokenizer cannot be used
  counts = [answer_key(w) for w in ("zero", "one", "two", "three", "four", "five", "six",
                                     "seven", "eight")]
  rows = R.encode_answers(counts, length=4)
  assert len({tuple(r) for r in rows}) == 9 and (rows[:, 0] > 0).all()
  reward, has, disagree = R.disagreement_reward(
      R.encode_answers(["5", "6"]), np.stack([R.encode_answers(["6", "6"])] * 2),
      np.ones(2, bool), -1.0)
  np.testing.assert_array_equal(np.asarray(disagree), [True, False])
  long = R.encode_answers(["a" * 40, "a" * 40, "a" * 39 + "b"], length=16)
  assert (long[0] == long[1]).all() and not (long[0] == long[2]).all()


def test_encode_answers_never_cuts_an_answer():
  """Answers longer than the id budget are fingerprinted, not cut: equal long
  answers stay equal, long answers that share a prefix differ, and no long
  answer equals a short one."""
  rows = R.encode_answers(["big red dog", "The big red dog.", "big red cat", "big"], enc, 2)
  assert (rows[:3] < 0).all() and (rows[3] >= 0).all()
  np.testing.assert_array_equal(rows[0], rows[1])          # same normalised answer
  assert not np.array_equal(rows[0], rows[2])              # same first two words
  refs = np.stack([rows[0:1], rows[1:2]])
  reward, has, _ = R.disagreement_reward(rows[2:3], refs, np.ones(1, bool), -1.0)
  assert bool(has[0]) and float(reward[0]) == 1.0
  reward, _, _ = R.disagreement_reward(rows[1:2], refs, np.ones(1, bool), -1.0)
  assert float(reward[0]) == 0.0


def test_soft_and_judge_terms():
  reward = np.array([1.0, 0.0, -1.0], np.float32)
  has = np.array([True, True, False])
  valid = np.array([True, True, False])
  out = R.add_soft_term(reward, np.array([2.0, 0.5, 9.0], np.float32), has, valid, 0.1)
  np.testing.assert_allclose(np.asarray(out), [1 + 0.1 * (1 - np.exp(-2.0)),
                                               0.1 * (1 - np.exp(-0.5)), -1.0], rtol=1e-6)
  r, _, d = R.judged_reward(np.array([0.2, 0.9, 0.1]), has, valid, -1.0, 0.5)
  np.testing.assert_array_equal(np.asarray(d), [True, False, False])
  np.testing.assert_allclose(np.asarray(r), [1.0, 0.0, -1.0])


def test_reward_config_validation_names_every_problem():
  with pytest.raises(ValueError) as e:
    R.RewardConfig(consensus="most", mode="vibes", soft_weight=-1.0)
  msg = str(e.value)
  assert "consensus" in msg and "mode" in msg and "soft_weight" in msg


# ---------------------------------------------------------------------------
# GRPO arithmetic
# ---------------------------------------------------------------------------


def test_group_advantages_by_hand():
  r = [1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]
  adv = np.asarray(grpo.group_advantages(r, 4, eps=0.0 + 1e-12))
  # group 1: mean 0.25, population std sqrt(3)/4
  std = math.sqrt(3) / 4
  np.testing.assert_allclose(adv[:4], [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std],
                             rtol=1e-5)
  np.testing.assert_allclose(adv[4:], 0.0)        # equal rewards: no signal
  unscaled = np.asarray(grpo.group_advantages(r, 4, scale=False))
  np.testing.assert_allclose(unscaled[:4], [0.75, -0.25, -0.25, -0.25])
  with pytest.raises(ValueError, match="multiple"):
    grpo.group_advantages(r[:7], 4)


def test_aggregation_weights_by_hand():
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  w = np.asarray(grpo.aggregation_weights(mask, "token_mean"))
  np.testing.assert_allclose(w, mask / 4.0)
  w = np.asarray(grpo.aggregation_weights(mask, "seq_mean_token_mean"))
  np.testing.assert_allclose(w, [[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0]])
  w = np.asarray(grpo.aggregation_weights(mask, "seq_mean_token_sum"))
  np.testing.assert_allclose(w, mask / 8.0)


def test_grpo_loss_by_hand():
  # Two sequences of two tokens; the second token of row 1 is padding.
  logp = np.log(np.array([[0.5, 0.2], [0.3, 0.9]]))
  old = np.log(np.array([[0.25, 0.2], [0.5, 0.9]]))
  ref = np.log(np.array([[0.5, 0.1], [0.3, 0.5]]))
  adv = np.array([1.0, -2.0])
  mask = np.array([[1, 1], [1, 0]], bool)
  cfg = grpo.GRPOConfig(num_samples=2, clip_eps=0.2, kl_beta=0.1, loss_agg="token_mean")
  loss, m = grpo.grpo_loss(logp, old, ref, adv, mask, cfg)
  # token (0,0): ratio 2 -> clipped to 1.2 (A > 0): surr 1.2; kl 0
  # token (0,1): ratio 1: surr 1; kl = 0.5 - log 0.5 - 1
  # token (1,0): ratio 0.6 -> min(0.6 * -2, 0.8 * -2) = -1.6; kl 0
  kl01 = 0.5 - math.log(0.5) - 1
  per = [-(1.2 - 0.0), -(1.0 - 0.1 * kl01), -(-1.6 - 0.0)]
  np.testing.assert_allclose(float(loss), sum(per) / 3, rtol=1e-6)
  np.testing.assert_allclose(float(m["kl"]), kl01 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(m["clip_frac"]), 2 / 3, rtol=1e-6)


def test_grpo_config_validation():
  with pytest.raises(ValueError) as e:
    grpo.GRPOConfig(num_samples=1, loss_agg="mean", updates_per_batch=0)
  msg = str(e.value)
  assert "num_samples" in msg and "loss_agg" in msg and "updates_per_batch" in msg


# ---------------------------------------------------------------------------
# Editor
# ---------------------------------------------------------------------------


def _scene():
  return Scene((Obj(0, 0, "circle", "red", "large"), Obj(2, 2, "square", "blue", "small")))


def test_scene_editor_renders_edits_and_rejects_with_reasons():
  ed = scene_editor.SceneEditor()
  s = _scene()
  img = world.render(s)
  out = ed.edit(np.stack([img, img]), ["recolour the red circle to green",
                                       "recolour the purple triangle to green"],
                [s.to_json(), s.to_json()])
  assert out[0].ok and out[0].factor == "colour"
  assert Scene.from_json(out[0].context).objects[0].colour == "green"
  np.testing.assert_array_equal(out[0].image, world.render(Scene.from_json(out[0].context)))
  assert not out[1].ok and out[1].reason and out[1].image is None
  gen = ed.generate(["a small red circle at the top left", "a flying dog"])
  assert gen[0].ok and not gen[1].ok and gen[1].reason
  checks = ed.check_question([s.to_json()] * 2, ["what colour is the circle?", "why?"])
  assert checks[0] == (True, "") and not checks[1][0]
  # Strict: only the templates' language (what the models were trained on).
  off = ["is there a red object?", "what colour is the circle", "What colour is the circle?"]
  assert not any(ok for ok, _ in ed.check_question([s.to_json()] * 3, off))
  assert all(ok for ok, _ in scene_editor.SceneEditor(strict=False).check_question(
      [s.to_json()] * 3, off))
  assert ed.answer_space([s.to_json()] * 2, ["is there a red circle?", "why?"]) == \
      [("yes", "no"), None]
  assert ed.ground_truth([s.to_json()], ["what colour is the square?"]) == ["blue"]
  with pytest.raises(ValueError, match="unknown editor"):
    editing.get_editor("dalle")
  with pytest.raises(ValueError, match="built from its checkpoints"):
    editing.get_editor("flux")


def test_mixture_validation_and_draws():
  m = rollout.check_mixture({"question": 2.0, "edit": 2.0})
  assert m == {"question": 0.5, "edit": 0.5}
  with pytest.raises(ValueError, match="unknown pairings"):
    rollout.check_mixture({"paint": 1.0})
  with pytest.raises(ValueError, match="not all 0"):
    rollout.check_mixture({"question": 0.0})
  draws = rollout.draw_pairings(m, 400, np.random.default_rng(0))
  assert draws.count("question") == 200 and draws[:20] != sorted(draws[:20])
  # Systematic: each count is floor or ceil of n p, never above max_counts.
  mix = rollout.check_mixture({"question": 0.5, "edit": 0.25, "edit_question": 0.2,
                               "caption_question": 0.05})
  rng = np.random.default_rng(1)
  most = rollout.max_counts(mix, 8)
  seen = set()
  for _ in range(200):
    c = rollout.pairing_counts(mix, 8, rng)
    assert sum(c.values()) == 8
    for k, v in c.items():
      assert np.floor(8 * mix[k]) <= v <= most[k]
      seen.add((k, v))
  assert ("edit_question", 1) in seen and ("edit_question", 2) in seen
  assert rollout.second_text_budget(mix, 8, 4) == 4 * (2 + 1)


# ---------------------------------------------------------------------------
# Models: one rollout, the sharded step, a toy policy that learns. Each
# compiles samplers and GRPO steps (~30-70 s apiece on 2 CPU cores), so they
# are marked slow (`pytest -m slow`); CI's smoke main job runs the audit
# stage end to end through the same code.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models():
  ptok, atok = world_tokenizer("paligemma"), world_tokenizer("gemma3")
  pal = presets.tiny_paligemma2(vocab_size=512, width=32, depth=1, image_size=48,
                                patch_size=16, vision_width=16, vision_depth=1,
                                sliding_window=None)
  aud = presets.get_preset("scene-gemma3")
  aud = dataclasses.replace(
      aud, text=dataclasses.replace(aud.text, width=32, depth=1, head_dim=8, mlp_dim=64,
                                    vision_proj_dim=16, scan_unroll=1),
      vision=dataclasses.replace(aud.vision, width=16, depth=1, mlp_dim=32, scan_unroll=1))
  answerers = {n: models.VLM.random(pal, seed=i, tokenizer=ptok)
               for i, n in enumerate(["target", "ref_a", "ref_b"])}
  return models.VLM.random(aud, seed=5, tokenizer=atok), answerers


def _seeds(n):
  rng = np.random.default_rng(3)
  out = []
  for _ in range(n):
    s = world.random_scene(rng, 2, 4)
    out.append(rollout.Seed(world.render(s), s.to_json(), "how many objects are there?"))
  return out


@pytest.mark.slow
def test_rollout_with_tiny_random_models(tiny_models):
  auditor, answerers = tiny_models
  k = 2
  auditing = rollout.Auditing(Sampler(auditor), {n: Sampler(m) for n, m in answerers.items()},
                              "target", ["ref_a", "ref_b"], scene_editor.SceneEditor(),
                              R.RewardConfig(invalid_reward=-0.5), num_samples=k,
                              max_new_tokens=6, tasks=AUDITOR_TASKS)
  pairings = ["question", "edit", "edit_question"]
  roll = auditing.run(_seeds(3), pairings, jax.random.key(0))
  assert roll.n == 3 * k and roll.pairings == [p for p in pairings for _ in range(k)]
  assert [len(t) for t in roll.texts] == [1, 1, 1, 1, 2, 2]
  for i in range(roll.n):
    # rewards follow the validity and the answers, row by row
    if not roll.valid[i]:
      assert roll.reward[i] == -0.5 and roll.reason[i]
    else:
      cons, said = roll.consensus[i], roll.parsed["target"][i]
      assert said in ("", answer_key(roll.answers["target"][i]))
      assert roll.answered[i] == bool(said)
      assert roll.reward[i] == float(bool(cons) and bool(said) and said != cons)
    if roll.pairings[i] == "edit" and roll.valid[i]:
      assert roll.question[i] == "how many objects are there?"
  # GRPO rows: a placeholder second row for one-text pairings has no loss tokens
  from auditdm_jax.audit.learner import build_batch
  adv = np.asarray(grpo.group_advantages(roll.reward, k))
  # Packed: 6 first texts, the 2 second texts, then 3 placeholders of a budget of 5.
  batch = build_batch(auditor.config, roll, adv, 112, 5, "token_mean")
  assert batch["tokens"].shape[0] == roll.n + 5
  live = batch["loss_mask"].any(axis=1)
  np.testing.assert_array_equal(live, [True] * 8 + [False] * 3)
  np.testing.assert_allclose(batch["advantages"][6:8], adv[4:6])
  with pytest.raises(ValueError, match="budget"):
    build_batch(auditor.config, roll, adv, 112, 1, "token_mean")
  np.testing.assert_allclose(batch["weights"].sum(), 1.0, rtol=1e-6)


def _toy_batch(cfg, tok, images, rows, prompt, adv):
  return grpo.grpo_batch(cfg, images, [prompt] * len(rows), rows, adv, 40, "token_mean")


@pytest.mark.slow
def test_grpo_step_grad_accum_matches_and_clip_path(tiny_models):
  auditor, _ = tiny_models
  cfg, tok = auditor.config, auditor.tokenizer
  prompt = tok.prompt(AUDITOR_TASKS["question"])
  rng = np.random.default_rng(0)
  rows = [list(rng.integers(10, 400, size=int(n))) + [cfg.eos_id]
          for n in rng.integers(1, 6, size=4)]
  images = np.stack([s.image for s in _seeds(4)])
  batch = _toy_batch(cfg, tok, images, rows, prompt, [1.0, -1.0, 0.5, -0.5])
  out = {}
  for accum in (1, 2):
    tcfg = sft.TrainConfig(steps=2, lr=1e-2, grad_accum=accum, tensorboard=False)
    tr = grpo.GRPOTrainer(cfg, tcfg, grpo.GRPOConfig(num_samples=2, kl_beta=0.1,
                                                     updates_per_batch=2))
    state = tr.init_state(auditor.params)
    b = dict(batch, ref_logp=tr.logprobs(auditor.params, batch),
             old_logp=tr.logprobs(state["params"], batch))
    state, m1 = tr.step(state, b)
    state, m2 = tr.step(state, b)
    out[accum] = (jax.tree.map(np.asarray, state["params"]), m1, m2)
  # The first update starts at pi = pi_old = pi_ref: KL 0, nothing clipped.
  assert abs(float(out[1][1]["kl"])) < 1e-6 and float(out[1][1]["clip_frac"]) == 0.0
  # The second sees pi != pi_old and pi_ref: a KL > 0.
  assert float(out[1][2]["kl"]) > 0
  # Accumulation changes nothing but float summation order: the loss and the
  # gradient norm (which Adam's scale invariance would hide in the params)
  # agree at both steps, and the params agree far below the update size 1e-2.
  for i in (1, 2):
    for key in ("loss", "grad_norm", "kl", "entropy"):
      np.testing.assert_allclose(float(out[1][i][key]), float(out[2][i][key]), rtol=1e-4,
                                 atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-4), out[1][0], out[2][0])
  with pytest.raises(ValueError, match="lacks"):
    tr.step(state, {k: v for k, v in b.items() if k != "advantages"})
  with pytest.raises(ValueError, match="non-finite"):
    tr.step(state, dict(b, advantages=np.array([np.nan, 0, 0, 0], np.float32)))


@pytest.mark.slow
def test_toy_policy_learns_to_raise_its_reward(tiny_models):
  """Reward = share of completion tokens with ids below V/4: GRPO on the
  tiny auditor must raise it well above the random policy's ~1/4."""
  auditor, _ = tiny_models
  cfg, tok = auditor.config, auditor.tokenizer
  k, n_prompts, steps = 8, 4, 25
  prompt = tok.prompt(AUDITOR_TASKS["question"])
  images = np.stack([s.image for s in _seeds(n_prompts)])
  tcfg = sft.TrainConfig(steps=steps, lr=2e-2, warmup_steps=0, schedule="constant",
                         tensorboard=False)
  gcfg = grpo.GRPOConfig(num_samples=k, kl_beta=0.0)
  tr = grpo.GRPOTrainer(cfg, tcfg, gcfg)
  state = tr.init_state(auditor.params)
  sampler = Sampler(auditor)
  sp = SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=k)
  limit = cfg.text.vocab_size // 4

  def reward(out):
    r = []
    for row, n in zip(out.tokens, out.lengths):
      toks = [int(t) for t in row[:n] if int(t) != cfg.eos_id] or [cfg.eos_id]
      r.append(np.mean([t < limit for t in toks]))
    return np.asarray(r, np.float32)

  history = []
  for step in range(steps):
    sampler.set_params(state["params"])
    out = sampler.sample(images, [prompt] * n_prompts, sp, rng=jax.random.key(step))
    r = reward(out)
    history.append(float(r.mean()))
    rows = [list(out.tokens[i, :out.lengths[i]]) for i in range(len(r))]
    batch = _toy_batch(cfg, tok, np.repeat(images, k, 0), rows, prompt,
                       grpo.group_advantages(r, k))
    batch["ref_logp"] = tr.logprobs(state["params"], batch)
    state, m = tr.step(state, batch)
    assert m["finite"]
  first, last = np.mean(history[:3]), np.mean(history[-3:])
  assert first < 0.45, history
  assert last > first + 0.3, history


def test_reward_hacking_by_degenerate_questions_pays_nothing():
  """The hack GRPO found with a permissive parser: drop the '?' ("is there a
  yellow triangle"), a form no model saw, so every model fails to stop; the
  target says "nono", the references "nononono", and an exact comparison
  paid that as a disagreement. Now the question is rejected (strict), and
  even on a valid question, answers outside the answer space do not parse:
  the references abstain and the target has not answered."""
  ed = scene_editor.SceneEditor()
  s = Scene((Obj(0, 0, "triangle", "yellow", "large"), Obj(2, 2, "square", "blue", "small")))
  ctx = [s.to_json()] * 3
  qs = ["is there a yellow triangle", "is there a yellow triangle?", "is there a yellow triangle?"]
  valid = np.array([ok for ok, _ in ed.check_question(ctx, qs)])
  np.testing.assert_array_equal(valid, [False, True, True])
  spaces = ed.answer_space(ctx, qs)
  raw = {"target": ["nono", "nono", "no"], "ref_a": ["nononono", "nononono", "yes"],
         "ref_b": ["nononono", "nononono", "Yes."]}
  parsed = {m: [R.extract_answer(a, sp) for a, sp in zip(v, spaces)] for m, v in raw.items()}
  assert parsed["target"] == ["", "", "no"] and parsed["ref_b"] == ["", "", "yes"]
  reward, has, disagree = R.disagreement_reward(
      ids(parsed["target"]), np.stack([ids(parsed[r]) for r in ("ref_a", "ref_b")]),
      valid, -1.0)
  # Row 0: invalid. Row 1: the references abstain, no consensus. Row 2: a real find.
  np.testing.assert_array_equal(np.asarray(disagree), [False, False, True])
  np.testing.assert_array_equal(np.asarray(has), [False, False, True])
  np.testing.assert_allclose(np.asarray(reward), [-1.0, 0.0, 1.0])
  # A babbling target under a real consensus has not answered: no find either.
  r2, _, d2 = R.disagreement_reward(ids([R.extract_answer("nono", ("yes", "no"))]),
                                    np.stack([ids(["no"]), ids(["no"])]), np.ones(1, bool), -1.0)
  assert not bool(d2[0]) and float(r2[0]) == 0.0
  assert R.extract_answer("Two.", ("zero", "one", "two")) == "2"
  assert R.extract_answer("anything at all", None) == "anything at all"


def test_grpo_completion_slots_equal_the_full_projection():
  """TrainConfig.loss_slots in the GRPO step and `logprobs`: the vocabulary
  projected only at the completion tokens gives the full projection's
  log-probs there (0 elsewhere) and the same two updates (pi_old != pi at the
  second: the ratio and KL live); the full path here accumulates two
  microbatches, the slots path takes one (no accumulation loop)."""
  cfg = presets.tiny_gemma3(vocab_size=256, width=32, depth=2, image_size=32, patch_size=8,
                            vision_width=16, vision_depth=1, mm_tokens_per_image=4,
                            sliding_window=8, num_heads=2, num_kv_heads=1, head_dim=16,
                            mlp_dim=64, boi_id=252, eoi_id=253, image_token_id=255)
  params = models.VLM.random(cfg, seed=1).params
  ref = models.VLM.random(cfg, seed=2).params
  rng = np.random.default_rng(0)
  prompts = [[2, cfg.boi_id] + rng.integers(3, 250, int(n)).tolist() for n in (3, 5, 2, 4)]
  comps = [rng.integers(3, 250, int(n)).tolist() + [cfg.eos_id] for n in (5, 0, 2, 6)]
  images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  batch = grpo.grpo_batch(cfg, images, prompts, comps, [1.0, -1.0, 0.5, -0.5], 24,
                          "seq_mean_token_mean")
  gcfg = grpo.GRPOConfig(num_samples=2, kl_beta=0.1, loss_agg="seq_mean_token_mean",
                         updates_per_batch=2)
  out = {}
  for slots, accum in ((0, 2), (7, 1)):
    tcfg = sft.TrainConfig(steps=2, lr=1e-2, warmup_steps=0, grad_accum=accum,
                           loss_slots=slots, tensorboard=False, progress=False)
    tr = grpo.GRPOTrainer(cfg, tcfg, gcfg)
    state = tr.init_state(params)
    b = dict(batch, ref_logp=tr.logprobs(jax.device_put(ref, tr.param_shardings), batch),
             old_logp=tr.logprobs(state["params"], batch))
    ms = []
    for _ in range(2):
      state, m = tr.step(state, b)
      ms.append(m)
    mu = {path_str(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(state["opt_state"])
          if ".mu[" in jax.tree_util.keystr(p)}
    out[(slots, accum)] = b, ms, mu
  full_b, full_m, full_mu = out[(0, 2)]
  mask = batch["loss_mask"]
  assert mask.sum() == 17
  b, ms, mu = out[(7, 1)]
  for k in ("ref_logp", "old_logp"):
    np.testing.assert_allclose(b[k][mask], full_b[k][mask], atol=1e-5)
    assert (b[k][~mask] == 0).all() and (full_b[k][~mask] != 0).any()
  for m, fm in zip(ms, full_m):
    for k in ("loss", "kl", "entropy", "clip_frac", "grad_norm", "completion_tokens"):
      np.testing.assert_allclose(float(m[k]), float(fm[k]), rtol=1e-4, atol=1e-7, err_msg=k)
  assert float(ms[1]["kl"]) > 0
  # Adam's first moment (the two gradients): its params would amplify float
  # noise in gradients near 0 to +-lr.
  scale = max(np.abs(v).max() for v in full_mu.values())
  assert mu.keys() == full_mu.keys() and len(mu) > 10
  for k in mu:
    np.testing.assert_allclose(mu[k], full_mu[k], rtol=1e-3, atol=1e-5 * scale, err_msg=k)
  tr7 = grpo.GRPOTrainer(cfg, sft.TrainConfig(steps=2, loss_slots=5, tensorboard=False), gcfg)
  with pytest.raises(ValueError, match="more than TrainConfig.loss_slots=5"):
    tr7.step(tr7.init_state(params), out[(7, 1)][0])
