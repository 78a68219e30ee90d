"""What the scene world tells the mining (`mine.failure_types.Knowledge`):
the attributes a question names of its subject (`parse.subject_attributes`)
and the truth of mined records (`scene_truth`). The mine and report stages
pass `KNOWLEDGE` to the generic mining code.
"""

from __future__ import annotations

from auditdm_jax.mine.failure_types import Knowledge
from auditdm_jax.scenes import parse
from auditdm_jax.scenes.world import Scene


def scene_truth(records_by_id: dict[str, dict]):
  """id -> (skill, facets, answer) by the scene world, or None (no scene)."""
  def truth(i: str):
    r = records_by_id[i]
    if not r["context"]:
      return None
    q, _ = parse.try_answer(Scene.from_json(r["context"]), r["question"])
    return None if q is None else (q.skill, q.facets, q.answer)
  return truth


KNOWLEDGE = Knowledge(attributes=parse.subject_attributes, truth_of=scene_truth)
