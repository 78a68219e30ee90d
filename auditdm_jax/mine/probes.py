"""Mined probes as exemplar-store records: the consensus-backed, well-formed rows
of a rollout, keyed by question + image (deduplicated across chunks)."""

from __future__ import annotations

import hashlib

import numpy as np

from auditdm_jax.audit import reward as reward_lib
from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.mine import failure_types as ft
from auditdm_jax.utils.answers import answer_key


def dedup_key(question: str, image: np.ndarray) -> str:
  h = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
  return hashlib.sha1(f"{answer_key(question)}|{h}".encode()).hexdigest()[:16]


def probe_records(roll: rollout_lib.Rollout, seeds, seed_index, k: int, targets, refs,
                  rule: str, editor, auditor: str, step: int,
                  judge_threshold: float | None = None) -> list[dict]:
  """The consensus-backed, well-formed rows of a rollout as store records.
  Answers are compared as parsed (`Rollout.parsed`); a target whose answer
  does not parse has not answered and is not a failure of this probe.

  `failed_exact` lists the targets whose answer differs from the consensus
  exactly. In judge mode (`judge_threshold` given; the rollout's `p_same`
  holds every target's), `failed` is the judge's decision: the targets of
  `failed_exact` whose p(same meaning) is below the threshold, and `p_same`
  {target: p} rides along; otherwise `failed` is `failed_exact`. (The store
  keeps `failed` and the answers, from which `exact_failed` recomputes the
  exact decision.)"""
  ref_answers = [roll.parsed[r] for r in refs]
  cons, has = rollout_lib.consensus_text(ref_answers, rule)
  skill_of = getattr(editor, "question_skill", None)
  if judge_threshold is not None:
    missing = [t for t in targets if t not in roll.p_same]
    if missing:
      raise ValueError(f"judge mode: the rollout has no judge decisions for {missing}")
  out = []
  for i in range(roll.n):
    if not (roll.valid[i] and has[i]):
      continue
    pseudo = next(roll.answers[r][i] for r in refs if roll.parsed[r][i] == cons[i])
    failed_exact = [t for t in targets if roll.parsed[t][i] and roll.parsed[t][i] != cons[i]]
    failed = failed_exact
    judged = {}
    if judge_threshold is not None:
      judged = {t: float(roll.p_same[t][i]) for t in targets}
      failed = [t for t in failed_exact if judged[t] < judge_threshold]
    skill = skill_of(roll.context[i], roll.question[i]) if skill_of else ""
    texts = roll.texts[i]
    s = i // k
    extra = {"failed_exact": failed_exact, "descriptor": roll.descriptor[i]}
    if judge_threshold is not None:
      extra["p_same"] = judged
    out.append({
        "id": dedup_key(roll.question[i], roll.image[i]),
        "pairing": roll.pairings[i], "route": rollout_lib.PAIRINGS[roll.pairings[i]][0],
        "auditor_text": texts[0], "auditor_text2": texts[1] if len(texts) > 1 else "",
        "question": roll.question[i], "pseudo_label": pseudo,
        "answers": {m: roll.answers[m][i] for m in list(targets) + list(refs)},
        "failed": failed, "skill": skill, "factor": roll.factor[i],
        "category": ft.category(skill, cons[i], roll.factor[i]),
        "context": roll.context[i] if isinstance(roll.context[i], str) else "",
        "auditor": auditor, "auditor_step": int(step), "seed_index": int(seed_index[s]),
        "seed_image": seeds[s].image, "image": roll.image[i], **extra})
  return out


def exact_failed(record: dict, targets, editor) -> list[str]:
  """The targets whose answer differs from the consensus exactly, from a
  stored record (its answers read through the question's answer space, the
  consensus being the normalised `pseudo_label`): `failed_exact` of
  `probe_records`, which the store does not keep."""
  space = editor.answer_space([record["context"] or None], [record["question"]])[0]
  cons = answer_key(record["pseudo_label"])
  out = []
  for t in targets:
    said = reward_lib.extract_answer(record["answers"][t], space)
    if said and said != cons:
      out.append(t)
  return out


def judge_summary(records: list[dict], targets, editor) -> dict:
  """Judge mode: per target, the exact comparison's failures, the judge's
  (`failed`), and how they differ: `judge_exact_disagree` is the share of
  the exact failures the judge calls the same (NaN when there are none);
  `judge_differs_exact_same` counts judge failures without an exact one (0
  by construction: the judge is only asked where the answers differ)."""
  exact_of = [exact_failed(r, targets, editor) for r in records]   # once per record
  out = {}
  for t in targets:
    exact = np.array([t in e for e in exact_of], bool)
    judge = np.array([t in r["failed"] for r in records], bool)
    n = int(exact.sum())
    out[t] = {"exemplars_exact": n, "exemplars_judge": int(judge.sum()),
              "judge_exact_disagree": float((exact & ~judge).sum() / n) if n else float("nan"),
              "judge_same_exact_differs": int((exact & ~judge).sum()),
              "judge_differs_exact_same": int((judge & ~exact).sum())}
  return out
