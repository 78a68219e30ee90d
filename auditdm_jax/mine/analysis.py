"""The mined records' failure types and, where a world knows the truth (the
scene world's `failure_types.Knowledge`, passed in by the stage), what it says
of them: planted-gap recall, exemplar and label precision."""

from __future__ import annotations

import numpy as np

from auditdm_jax.mine import failure_types as ft
from auditdm_jax.utils.answers import answer_key


def reference_errors(records: list[dict], refs: list[str], truth) -> dict[str, dict]:
  """Per skill, over the consensus-backed probes whose truth is known: how
  often each reference is wrong, how often the consensus (the pseudo-label)
  is wrong, i.e. the references agree on one wrong answer ("joint"), and
  the product of the references' own error rates, what the joint rate would
  be if their errors were independent ("independent"). The paper's
  "ensemble-wide blind spot", measured; it never enters the reward."""
  per: dict[str, dict] = {}
  for r in records:
    t = truth(r["id"])
    if t is None:
      continue
    answer = answer_key(t[2])
    row = per.setdefault(t[0], {"probes": 0, "joint": 0, **{n: 0 for n in refs}})
    row["probes"] += 1
    row["joint"] += answer_key(r["pseudo_label"]) != answer
    for n in refs:
      row[n] += answer_key(r["answers"].get(n, "")) != answer
  out = {}
  for skill in sorted(per):
    row = per[skill]
    n = row["probes"]
    own = {name: row[name] / n for name in refs}
    out[skill] = {"probes": n, "joint": row["joint"] / n, "wrong": own,
                  "independent": float(np.prod(list(own.values()))) if own else float("nan")}
  return out


def analyse(records: list[dict], targets: list[str], focus: str, gaps: dict[str, list],
            m: dict, refs: list[str] = (), *, knowledge: ft.Knowledge) -> dict:
  """Failure types and, where the world knows it, their truth measurements.
  `gaps`: each target's planted gap specs, parsed (empty: none known); `m`:
  the mine settings (merge_rate, min_probes, top_k, purity); `refs`: the
  references, whose joint errors on the probes are measured
  (`reference_errors`); `knowledge`: the world's question attributes and
  truth (`failure_types.Knowledge`)."""
  probes = [ft.Probe(r["id"], r["skill"], answer_key(r["pseudo_label"]),
                     r["factor"], tuple(r["failed"]),
                     tuple(sorted(knowledge.attributes(r["question"]).items())))
            for r in records]
  types = ft.group(probes, targets, focus, float(m["merge_rate"]), int(m["min_probes"]))
  types = [t for t in types if sum(t.failures.values())]   # no target fails: not a failure type
  by_id = {r["id"]: r for r in records}
  truth = knowledge.truth_of(by_id)
  planted, found, total = {}, 0, 0
  for t in targets:
    res = ft.gap_recall(types, t, list(gaps.get(t, ())), truth, int(m["top_k"]), float(m["purity"]))
    planted[t] = res
    found += sum(v["found"] for v in res.values())
    total += len(res)
  exemplars = [r for r in records if r["failed"]]
  prec = {t: ft.exemplar_precision(exemplars, t, truth) for t in targets}
  focus_gaps = planted[focus]
  ref_err = reference_errors(records, list(refs), truth)
  return {
      "failure_types": [t.to_json(focus) for t in types],
      "planted_gaps": planted,
      "planted_gap_recall": (sum(v["found"] for v in focus_gaps.values()) / len(focus_gaps)
                             if focus_gaps else float("nan")),
      "planted_gap_recall_all_targets": found / total if total else float("nan"),
      "exemplar_precision": prec[focus]["precision"],
      "label_precision": prec[focus]["label_precision"],
      "precision": prec,
      "reference_errors": ref_err,
      "reference_joint_error_max": max((v["joint"] for v in ref_err.values()),
                                       default=float("nan"))}
