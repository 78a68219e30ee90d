"""The auditor's GRPO learner: one audit step is a rollout and its update(s).

Every step draws `prompts_per_step` seed images (a deterministic function of
the run's seed and the step, so a resumed run sees what an uninterrupted one
would), gives each a pairing from the mixture, samples K auditor texts per
seed (`rollout.Auditing`), scores them with the jitted disagreement reward and
takes `updates_per_batch` GRPO updates (`grpo.GRPOTrainer`) with a k3 KL to
the warm-start auditor. `GRPOLearner.step` is the step function of the one
training loop (`train/loop.py`); the loop owns resume, SIGTERM, the finite
guard, checkpoints, metrics rows and the bar.

Also here: the seed pool, the packed GRPO batch, the per-step figures, the
finds journal and the held-out search measurement (`evaluate_search`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time

import jax
import numpy as np

from auditdm_jax import sharding
from auditdm_jax.audit import diversity as diversity_lib
from auditdm_jax.audit import grpo
from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.train import loop as loop_lib
from auditdm_jax.utils.fileio import atomic_write_text


class SeedPool:
  """Seed images (image, context, seed question) of a seed source: the scene
  world's (context: the scene) or a named dataset's (no context)."""

  def __init__(self, src, start: int = 0, stop: int | None = None):
    self.src = src
    self.start, self.stop = start, len(src) if stop is None else min(stop, len(src))
    if self.stop - self.start < 1:
      raise ValueError(f"the seed-image pool [{start}, {stop}) is empty "
                       f"(the split holds {len(src)} records)")

  def __len__(self) -> int:
    return self.stop - self.start

  def get(self, indices) -> list[rollout_lib.Seed]:
    out = []
    for i in indices:
      r = self.src[self.start + int(i) % len(self)]
      out.append(rollout_lib.Seed(np.asarray(r["image"]), r.get("scene", None),
                                  r["question"]))
    return out


def step_rng(seed: int, step: int) -> np.random.Generator:
  return np.random.default_rng([seed, 7919, step])


def build_batch(cfg, roll: rollout_lib.Rollout, advantages, seq_len: int, second_rows: int,
                loss_agg: str) -> dict[str, np.ndarray]:
  """GRPO rows, packed: every sample's first text, then the second texts of
  the two-text samples, then zero-weight placeholders up to `second_rows`
  (`rollout.second_text_budget`), so the batch shape never changes and a
  one-text sample costs one row, not two."""
  firsts = list(range(roll.n))
  seconds = [i for i in range(roll.n) if len(roll.texts[i]) > 1]
  if len(seconds) > second_rows:
    raise ValueError(f"{len(seconds)} second texts exceed the batch's budget of "
                     f"{second_rows} rows (rollout.second_text_budget)")
  images, prompts, comps, adv, live = [], [], [], [], []
  for i, j in [(i, 0) for i in firsts] + [(i, 1) for i in seconds]:
    images.append(roll.images_in[i][j])
    prompts.append(roll.prompts[i][j])
    comps.append(roll.tokens[i][j] or [0])
    adv.append(advantages[i])
    live.append(True)
  for _ in range(second_rows - len(seconds)):   # placeholders: any valid row, masked out
    images.append(roll.images_in[0][0])
    prompts.append(roll.prompts[0][0])
    comps.append(roll.tokens[0][0] or [0])
    adv.append(0.0)
    live.append(False)
  batch = grpo.grpo_batch(cfg, np.stack(images), prompts, comps, np.asarray(adv), seq_len,
                          loss_agg)
  batch["loss_mask"] &= np.asarray(live)[:, None]
  batch["weights"] = np.asarray(grpo.aggregation_weights(batch["loss_mask"], loss_agg))
  return batch


def find_rows(roll: rollout_lib.Rollout, step: int, target: str) -> list[dict]:
  """The finds (`roll.success`) as journal rows; in judge mode each also
  carries the judge's p_same of the target's answer."""
  out = []
  for i in np.nonzero(roll.success)[0]:
    row = {"step": step, "pairing": roll.pairings[i], "descriptor": roll.descriptor[i],
           "texts": roll.texts[i],
           "question": roll.question[i], "factor": roll.factor[i],
           "context": roll.context[i], "consensus": roll.consensus[i],
           "target": target, "answers": {k: v[i] for k, v in roll.answers.items()}}
    if target in roll.p_same:
      row["p_same"] = float(roll.p_same[target][i])
    out.append(row)
  return out


def judge_exact(roll: rollout_lib.Rollout) -> dict[str, float]:
  """How the judge's decisions (`success`) and the exact comparison's
  (`exact_success`) differ on a judge-mode rollout:

    judged                    rows the judge was asked (the exact disagreements)
    judge_exact_disagree      the share of them the judge calls the same
                              (NaN when none was asked)
    judge_same_exact_differs  how many rows that is
    judge_differs_exact_same  rows the judge pays where the answers are equal
                              exactly: 0 by construction (those rows are never
                              asked), counted as a check

  and `exact_success_rate`, the exact comparison's success rate."""
  exact, judge = np.asarray(roll.exact_success), np.asarray(roll.success)
  n = int(exact.sum())
  same = int((exact & ~judge).sum())
  return {"exact_success_rate": float(exact.mean()), "judged": n,
          "judge_exact_disagree": same / n if n else float("nan"),
          "judge_same_exact_differs": same,
          "judge_differs_exact_same": int((judge & ~exact).sum())}


def judge_agreement(auditing: rollout_lib.Auditing, rolls) -> dict:
  """The judge against the exact comparison on every valid, consensus-backed
  row the target answered, the rows exact equality settles too (a
  measurement: the reward never asks the judge about those). On the scene
  world, where answers lie in a closed answer space, exact comparison is the
  truth, so this is the judge's accuracy:

    agreement            share of rows where both decide alike (NaN: no row)
    rows                 how many rows
    exact_same           {rows, judge_same}: rows with equal answers, and the
                         share the judge calls the same
    exact_differs        {rows, judge_differs}: rows with different answers,
                         and the share the judge calls different
  """
  same_exact, same_judge = [], []
  for roll in rolls:
    rows = roll.valid & roll.has_consensus & roll.answered
    asked = np.asarray(roll.judged[auditing.target])     # the rollout judged these already
    ex, jd = _judge_vs_exact(auditing, roll.image, roll.parsed[auditing.target],
                             roll.consensus, rows, asked, roll.p_same[auditing.target])
    same_exact.append(ex)
    same_judge.append(jd)
  return _agreement(np.concatenate(same_exact), np.concatenate(same_judge))


def judge_agreement_on_seeds(auditing: rollout_lib.Auditing, pool: SeedPool, budget: int,
                             batch: int) -> dict:
  """`judge_agreement` on the seeds' own questions (the first `budget` seeds
  of `pool`, in calls of `batch` rows): the target and the references answer
  each seed question about its image, and the judge is asked about every
  consensus-backed row the target answered. Unlike the auditor's probes
  (which a barely trained auditor may never write well), seed questions are
  always valid, so this measures the judge wherever the answerers answer."""
  same_exact, same_judge = [], []
  for start in range(0, budget, batch):
    idx = list(range(start, min(start + batch, budget)))
    idx += [idx[0]] * (batch - len(idx))              # fixed shape; extra rows dropped
    keep = min(batch, budget - start)
    seeds = pool.get(idx)
    images = np.stack([sd.image for sd in seeds])
    questions = [sd.question for sd in seeds]
    contexts = [sd.context for sd in seeds]
    valid = np.array([ok for ok, _ in auditing.editor.check_question(contexts, questions)])
    parsed = auditing.parse(auditing.answer(images, questions), contexts, questions)
    cons, has = rollout_lib.consensus_text([parsed[r] for r in auditing.references],
                                           auditing.rcfg.consensus)
    ans = parsed[auditing.target]
    rows = valid & has & np.array([bool(a) for a in ans])
    rows[keep:] = False
    ex, jd = _judge_vs_exact(auditing, images, ans, cons, rows)
    same_exact.append(ex)
    same_judge.append(jd)
  return _agreement(np.concatenate(same_exact), np.concatenate(same_judge))


def _judge_vs_exact(auditing, images, answers, cons, rows, asked=None, p_asked=None):
  """(exact says same, judge says same) on `rows`; the judge is asked about
  the rows not `asked` already (whose p_same is `p_asked`)."""
  asked = np.zeros(len(answers), bool) if asked is None else np.asarray(asked, bool)
  p = auditing.judge_rows(images, answers, cons, rows & ~asked)
  if p_asked is not None:
    p[asked] = np.asarray(p_asked)[asked]
  idx = np.nonzero(rows)[0]
  ex = np.array([answers[i] == cons[i] for i in idx], bool)
  return ex, p[idx] >= auditing.rcfg.judge_threshold


def _agreement(ex, jd) -> dict:
  rate = lambda x: float(x.mean()) if len(x) else float("nan")
  return {"agreement": rate(ex == jd), "rows": int(len(ex)),
          "exact_same": {"rows": int(ex.sum()), "judge_same": rate(jd[ex])},
          "exact_differs": {"rows": int((~ex).sum()), "judge_differs": rate(~jd[~ex])}}


def step_metrics(roll: rollout_lib.Rollout, editor=None, judge: bool = False
                 ) -> dict[str, float]:
  """Per-step figures; with the editor, `consensus_truth` too (how often the
  references' consensus is the ground truth on this step's probes; NaN when
  the editor knows no truth). Measurement only, never the reward. `judge`:
  the judge-mode figures of `judge_exact` too."""
  firsts = [t[0] for t in roll.texts]
  valid = np.maximum(roll.valid.sum(), 1)
  out = {"reward": float(roll.reward.mean()), "success_rate": float(roll.success.mean()),
         "consensus_rate": float(roll.has_consensus.mean()),
         "invalid_rate": float(1.0 - roll.valid.mean()),
         "unanswered_rate": float((roll.valid & ~roll.answered).sum() / valid),
         "distinct": len(set(firsts)) / max(len(firsts), 1),
         "top_question_share": (max(collections.Counter(roll.question).values()) / roll.n
                                if roll.n else float("nan"))}
  if editor is not None:
    out["consensus_truth"] = rollout_lib.consensus_truth(roll, editor)[0]
  if judge:
    out.update(judge_exact(roll))
  return out


def search_draws(dcfg: diversity_lib.DiversityConfig, mixture, n: int,
                 rng: np.random.Generator, weights=None) -> tuple[list[str], list[str]]:
  """(pairings, descriptors) of n search probes: without `weights`, pairings
  in the mixture's proportions and the descriptors walked evenly
  (`diversity.assign`); with them (`diversity.archive_weights`, keyed by
  cell), cells drawn in proportion to the weights."""
  if weights is None:
    pairings = rollout_lib.draw_pairings(mixture, n, rng)
    return pairings, diversity_lib.assign(dcfg, n, 0, rng)
  cells = [diversity_lib.split_cell(c) for c in diversity_lib.draw_weighted(weights, n, rng)]
  bad = sorted({p for p, _ in cells if p not in rollout_lib.PAIRINGS})
  if bad:
    raise ValueError(f"search weights name unknown pairings {bad}; known: "
                     f"{list(rollout_lib.PAIRINGS)}")
  return [p for p, _ in cells], [d for _, d in cells]


def evaluate_search(auditing: rollout_lib.Auditing, params, pool: SeedPool, budget: int,
                    mixture, seed: int, batch: int, weights=None
                    ) -> tuple[rollout_lib.Rollout, dict]:
  """One sample per held-out seed, `budget` seeds, with `params` as the policy
  (with descriptors: seed i asks through the i-th of a stratified walk, its
  pairing drawn from the mixture; with `weights`, `diversity.archive_weights`,
  through a cell, pairing x descriptor, drawn in proportion to them)."""
  auditing.auditor.set_params(params)
  rng = np.random.default_rng([seed, 104729])
  pairings, descs = search_draws(auditing.diversity, mixture, budget, rng, weights)
  rolls = []
  for start in range(0, budget, batch):
    idx = list(range(start, min(start + batch, budget)))
    idx += [idx[0]] * (batch - len(idx))              # fixed shape; extra rows dropped
    roll = auditing.run(pool.get(idx), [pairings[i] for i in idx],
                        jax.random.key(seed * 1000 + start), num_samples=1,
                        descriptors=[descs[i] for i in idx])
    keep = min(batch, budget - start)
    rolls.append((roll, keep))
  success = np.concatenate([r.success[:k] for r, k in rolls])
  valid = np.concatenate([r.valid[:k] for r, k in rolls])
  merged = merge_rollouts([r for r, _ in rolls], [k for _, k in rolls])
  return merged, {"success_rate": float(success.mean()), "valid_rate": float(valid.mean())}


def compare_search(auditing: rollout_lib.Auditing, trained, warm, pool: SeedPool, budget: int,
                   mixture, seed: int, batch: int, weights=None
                   ) -> tuple[dict, rollout_lib.Rollout]:
  """The trained vs the warm-start auditor on the same held-out seeds at the
  same sample budget: success and validity rates, the ground-truth precision
  of the trained auditor's finds, how often the consensus is the truth, the
  success rate per pairing, the ratio; and the trained auditor's rollout.
  Judge mode: also the exact comparison's success rates
  (`success_rate_exact`), how the judge's decisions differ from it (`judge`,
  see `judge_exact`) and the judge's agreement with it on every answered,
  consensus-backed row of both rollouts (`judge_agreement`) and on the
  held-out seeds' own questions (`judge_agreement_seed_questions`)."""
  roll_t, res_t = evaluate_search(auditing, trained, pool, budget, mixture, seed, batch,
                                  weights)
  roll_w, res_w = evaluate_search(auditing, warm, pool, budget, mixture, seed, batch)
  prec, n_known = rollout_lib.precision_gt(roll_t, auditing.editor)
  truth = {name: rollout_lib.consensus_truth(r, auditing.editor)[0]
           for name, r in (("trained", roll_t), ("warm_start", roll_w))}
  by_pairing = {p: float(roll_t.success[[i for i in range(roll_t.n)
                                         if roll_t.pairings[i] == p]].mean())
                for p in sorted(set(roll_t.pairings))}
  fig = {"budget": budget,
         "success_rate": {"trained": res_t["success_rate"], "warm_start": res_w["success_rate"]},
         "valid_rate": {"trained": res_t["valid_rate"], "warm_start": res_w["valid_rate"]},
         "precision_gt": prec, "finds_with_ground_truth": n_known,
         "consensus_truth": truth, "success_by_pairing": by_pairing,
         "unanswered_rate": {"trained": float(np.mean(roll_t.valid & ~roll_t.answered)),
                             "warm_start": float(np.mean(roll_w.valid & ~roll_w.answered))},
         "ratio": (res_t["success_rate"] / res_w["success_rate"]
                   if res_w["success_rate"] > 0 else float("inf"))}
  if auditing.judge is not None:
    je = {name: judge_exact(r) for name, r in (("trained", roll_t), ("warm_start", roll_w))}
    fig["success_rate_exact"] = {k: v.pop("exact_success_rate") for k, v in je.items()}
    fig["judge"] = {"model": getattr(auditing.judge, "name", ""),
                    "threshold": auditing.rcfg.judge_threshold,
                    **{key: {k: v[key] for k, v in je.items()} for key in je["trained"]}}
    fig["judge_agreement"] = judge_agreement(auditing, [roll_t, roll_w])
    fig["judge_agreement_seed_questions"] = judge_agreement_on_seeds(auditing, pool, budget,
                                                                     batch)
  return fig, roll_t


def search_per_seed(auditing: rollout_lib.Auditing, params, pool: SeedPool, n_seeds: int,
                    budget: int, mixture, seed: int, batch: int, weights=None
                    ) -> tuple[dict, rollout_lib.Rollout]:
  """The paper's search success: `budget` probes on each of the first
  `n_seeds` held-out seeds (with descriptors, spread over them:
  `diversity.spread`; with `weights`, each probe through a cell drawn in
  proportion to them, `search_draws`), the share of seeds with at least one
  consensus-backed disagreement. Returns (figures, the merged rollout) for
  `diversity_figures`; about `batch` rows a call."""
  auditing.auditor.set_params(params)
  rng = np.random.default_rng([seed, 7_368_787])
  if weights is None:
    groups, descs, k = diversity_lib.spread(auditing.diversity, n_seeds, budget)
    pairings = rollout_lib.draw_pairings(mixture, len(groups), rng)
  else:
    groups, k = [s for s in range(n_seeds) for _ in range(budget)], 1
    pairings, descs = search_draws(auditing.diversity, mixture, len(groups), rng, weights)
  per_call = max(1, batch // k)                          # groups a call: ~batch rows
  rolls, seeds_of = [], []
  for start in range(0, len(groups), per_call):
    sel = list(range(start, min(start + per_call, len(groups))))
    keep = len(sel)
    sel += [sel[0]] * (per_call - keep)                  # fixed shape; extra rows dropped
    roll = auditing.run(pool.get([groups[i] for i in sel]), [pairings[i] for i in sel],
                        jax.random.key(seed * 1000 + 17 + start), num_samples=k,
                        descriptors=[descs[i] for i in sel])
    rolls.append((roll, keep * k))
    seeds_of.append([groups[sel[j // k]] for j in range(keep * k)])
  merged = merge_rollouts([r for r, _ in rolls], [n for _, n in rolls])
  seed_rows = [g for s in seeds_of for g in s]
  fig = {"seeds": n_seeds, "budget": budget,
         "success": diversity_lib.per_seed_success(merged.success, seed_rows),
         "success_rate": float(np.mean(merged.success))}
  return fig, merged


def probe_diversity(roll: rollout_lib.Rollout, categories: list[str]) -> dict:
  """`diversity.diversity_figures` of a rollout's valid probes, `categories`
  naming each row's failure category (the caller's measurement; on the scene
  world the skill:answer categories, never the reward)."""
  idx = [i for i in range(roll.n) if roll.valid[i]]
  return diversity_lib.diversity_figures([roll.question[i] for i in idx],
                                         [bool(roll.success[i]) for i in idx],
                                         [categories[i] for i in idx])


def merge_rollouts(rolls, keeps) -> rollout_lib.Rollout:
  def cat(field):
    vals = [getattr(r, field)[:k] for r, k in zip(rolls, keeps)]
    if isinstance(vals[0], np.ndarray):
      return np.concatenate(vals)
    return [x for v in vals for x in v]
  by_model = ("answers", "parsed")
  arrays_by_model = ("p_same", "judged")
  kw = {f.name: cat(f.name) for f in dataclasses.fields(rollout_lib.Rollout)
        if f.name not in by_model + arrays_by_model}
  for field in by_model:
    kw[field] = {m: [a for r, k in zip(rolls, keeps) for a in getattr(r, field)[m][:k]]
                 for m in getattr(rolls[0], field)}
  for field in arrays_by_model:
    kw[field] = {m: np.concatenate([getattr(r, field)[m][:k] for r, k in zip(rolls, keeps)])
                 for m in getattr(rolls[0], field)}
  return rollout_lib.Rollout(**kw)


class GRPOLearner:
  """The audit step: seeds -> rollout -> advantages -> packed batch -> GRPO
  update(s). Successful finds are appended to `finds_path` (process 0)."""

  def __init__(self, trainer: grpo.GRPOTrainer, auditing: rollout_lib.Auditing,
               pool: SeedPool, mixture, *, seed: int, prompts_per_step: int, seq_len: int,
               warm_params, finds_path: str, log_examples: int = 2,
               journal: diversity_lib.Journal | None = None,
               adherence: diversity_lib.Adherence | None = None):
    self.trainer, self.auditing, self.pool, self.mixture = trainer, auditing, pool, mixture
    self.journal, self.adherence = journal, adherence
    self.gcfg = trainer.gcfg
    self.seed, self.prompts_per_step, self.seq_len = seed, prompts_per_step, seq_len
    self.second_rows = rollout_lib.second_text_budget(mixture, prompts_per_step,
                                                      self.gcfg.num_samples)
    self.warm_params, self.finds_path, self.log_examples = warm_params, finds_path, log_examples
    self._finds: list[dict] = []

  def step(self, state, step: int) -> loop_lib.StepOut:
    t0 = time.perf_counter()
    trainer, auditing, gcfg = self.trainer, self.auditing, self.gcfg
    rng = step_rng(self.seed, step)
    idx = rng.integers(0, len(self.pool), self.prompts_per_step)
    pairings = rollout_lib.draw_pairings(self.mixture, len(idx), rng)
    descs = diversity_lib.assign(auditing.diversity, len(idx), step * len(idx), rng)
    auditing.auditor.set_params(state["params"])
    roll = auditing.run(self.pool.get(idx), pairings, jax.random.key(self.seed * 100_003 + step),
                        descriptors=descs)
    adherent = None
    if self.adherence is not None:   # off-descriptor probes do not pay
      adherent = self.adherence(roll)
      roll.reward, paid = diversity_lib.apply_adherence(roll.reward, roll.success, adherent,
                                                        auditing.rcfg.invalid_reward)
    adv = np.asarray(grpo.group_advantages(roll.reward, gcfg.num_samples, gcfg.adv_eps,
                                           gcfg.scale_rewards))
    batch = build_batch(trainer.cfg, roll, adv, self.seq_len, self.second_rows, gcfg.loss_agg)
    batch["ref_logp"] = trainer.logprobs(self.warm_params, batch)
    if gcfg.updates_per_batch > 1:
      batch["old_logp"] = trainer.logprobs(state["params"], batch)
    local = sharding.local_rows(batch)   # every process holds the same rollouts
    for _ in range(gcfg.updates_per_batch):
      state, m = trainer.step(state, local)
      if not m["finite"]:                # the loop raises; nothing more is applied
        return loop_lib.StepOut(state, m, {})
    row = step_metrics(roll, auditing.editor, judge=auditing.judge is not None)
    row.update({k: float(m[k]) for k in ("loss", "kl", "entropy", "clip_frac", "grad_norm")})
    row["lr"] = float(trainer.schedule(int(state["step"]) - 1))
    row["step_time"] = time.perf_counter() - t0
    if adherent is not None:
      asked = np.array([bool(d) and v for d, v in zip(roll.descriptor, roll.valid)])
      row["adherence"] = float(adherent[asked].mean()) if asked.any() else float("nan")
      row["paid_rate"] = float(paid.mean())
    if self.journal is not None:
      self.journal.record(step + 1, roll.descriptor, roll.question,
                          roll.success if adherent is None else paid, roll.pairings,
                          write=sharding.is_primary())
      row["descriptors_found"] = float(sum(1 for d, n in self.journal.archive.successes.items()
                                           if d and n))
    self._finds = find_rows(roll, step + 1, auditing.target)
    if self._finds and sharding.is_primary():
      with open(self.finds_path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in self._finds)
    return loop_lib.StepOut(state, m, row)

  def on_log(self, step: int, row: dict) -> None:
    del step, row
    target = self.auditing.target
    for r in self._finds[:self.log_examples]:
      print(f"audit: find [{r['pairing']}] {r['texts']} -> Q {r['question']!r}: "
            f"{target} says {r['answers'][target]!r}, references say "
            f"{r['consensus']!r}", flush=True)


def truncate_finds(path: str, last_step: int) -> None:
  """Drops finds logged after `last_step` (a resumed run logs them again)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  atomic_write_text(path, "".join(rows))
