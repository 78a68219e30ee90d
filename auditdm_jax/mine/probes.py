"""Mined probes as exemplar-store records: the consensus-backed, well-formed rows
of a rollout, keyed by question + image (deduplicated across chunks)."""

from __future__ import annotations

import hashlib

import numpy as np

from auditdm_jax.audit import reward as reward_lib
from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.mine import failure_types as ft


def dedup_key(question: str, image: np.ndarray) -> str:
  h = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
  return hashlib.sha1(f"{reward_lib.normalise(question)}|{h}".encode()).hexdigest()[:16]


def probe_records(roll: rollout_lib.Rollout, seeds, seed_index, k: int, targets, refs,
                  rule: str, editor, auditor: str, step: int) -> list[dict]:
  """The consensus-backed, well-formed rows of a rollout as store records.
  Answers are compared as parsed (`Rollout.parsed`); a target whose answer
  does not parse has not answered and is not a failure of this probe."""
  ref_answers = [roll.parsed[r] for r in refs]
  cons, has = rollout_lib.consensus_text(ref_answers, rule)
  skill_of = getattr(editor, "question_skill", None)
  out = []
  for i in range(roll.n):
    if not (roll.valid[i] and has[i]):
      continue
    pseudo = next(roll.answers[r][i] for r in refs if roll.parsed[r][i] == cons[i])
    failed = [t for t in targets if roll.parsed[t][i] and roll.parsed[t][i] != cons[i]]
    skill = skill_of(roll.context[i], roll.question[i]) if skill_of else ""
    texts = roll.texts[i]
    s = i // k
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
        "seed_image": seeds[s].image, "image": roll.image[i]})
  return out
