"""The mined records' failure types and, in the scene world, what the truth says
of them: planted-gap recall, exemplar and label precision."""

from __future__ import annotations

from auditdm_jax.audit import reward as reward_lib
from auditdm_jax.mine import failure_types as ft
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


def analyse(records: list[dict], targets: list[str], focus: str, gaps: dict[str, list[str]],
            m: dict) -> dict:
  """Failure types and, in the scene world, their truth measurements.
  `gaps`: each target's planted gap specs (empty: none known); `m`: the mine
  settings (merge_rate, min_probes, top_k, purity)."""
  probes = [ft.Probe(r["id"], r["skill"], reward_lib.normalise(r["pseudo_label"]),
                     r["factor"], tuple(r["failed"]),
                     tuple(sorted(parse.subject_attributes(r["question"]).items())))
            for r in records]
  types = ft.group(probes, targets, focus, float(m["merge_rate"]), int(m["min_probes"]))
  types = [t for t in types if sum(t.failures.values())]   # no target fails: not a failure type
  by_id = {r["id"]: r for r in records}
  truth = scene_truth(by_id)
  planted, found, total = {}, 0, 0
  for t in targets:
    res = ft.gap_recall(types, t, list(gaps.get(t, ())), truth, int(m["top_k"]), float(m["purity"]))
    planted[t] = res
    found += sum(v["found"] for v in res.values())
    total += len(res)
  exemplars = [r for r in records if r["failed"]]
  prec = {t: ft.exemplar_precision(exemplars, t, truth) for t in targets}
  focus_gaps = planted[focus]
  return {
      "failure_types": [t.to_json(focus) for t in types],
      "planted_gaps": planted,
      "planted_gap_recall": (sum(v["found"] for v in focus_gaps.values()) / len(focus_gaps)
                             if focus_gaps else float("nan")),
      "planted_gap_recall_all_targets": found / total if total else float("nan"),
      "exemplar_precision": prec[focus]["precision"],
      "label_precision": prec[focus]["label_precision"],
      "precision": prec}
