"""The unlabelled failure types of the mined records: the clusters ranked as
`failure_types` ranks the labelled ones, named, measured against the truth
and against the labelled path (`analyse_unlabelled`, `mine_unlabelled`)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.mine import failure_types as ft
from auditdm_jax.mine.clusters.clustering import assign, centroids, cluster
from auditdm_jax.mine.clusters.config import DESCRIPTIVE, Ask, settings
from auditdm_jax.mine.clusters.embed import Embedder, combine
from auditdm_jax.mine.clusters.naming import (default_namers, descriptive_name, name_type,
                                              references_ask)
from auditdm_jax.mine.clusters.validation import Namer
from auditdm_jax.utils.answers import answer_key


def probes_of(records: Sequence[Mapping], knowledge: ft.Knowledge) -> list[ft.Probe]:
  """The records as `failure_types.Probe`s (as `analysis.analyse` makes them;
  `knowledge.attributes` reads what each question names of its subject)."""
  return [ft.Probe(r["id"], r.get("skill", ""), answer_key(r["pseudo_label"]),
                   r.get("factor", ""), tuple(r["failed"]),
                   tuple(sorted(knowledge.attributes(r["question"]).items())))
          for r in records]


def _ordered(x: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
  """The indices of cluster c, nearest its centroid first."""
  idx = np.nonzero(labels == c)[0]
  return idx[np.argsort(np.linalg.norm(x[idx] - x[idx].mean(0), axis=1), kind="stable")]


def unlabelled_types(records: Sequence[Mapping], x: np.ndarray, targets: Sequence[str],
                     focus: str, s: Mapping, *, knowledge: ft.Knowledge
                     ) -> tuple[list[ft.FailureType], np.ndarray]:
  """(failure types ranked for `focus`, int [N] type of each record, -1 none).
  `x` [N, D]: the records' combined features; `knowledge`: the world's
  (`failure_types.Knowledge`). The types are HDBSCAN clusters
  of the failure exemplars, joined by the other probes within their radius;
  each type's `ids` (the focus target's failures) run nearest-centroid first."""
  if focus not in targets:
    raise ValueError(f"focus target {focus!r} is not among the targets {list(targets)}")
  x = np.asarray(x, np.float32)
  if len(x) != len(records):
    raise ValueError(f"{len(records)} records but {len(x)} feature rows")
  failed = np.array([bool(r["failed"]) for r in records], bool)
  labels = np.full(len(records), -1, int)
  ex = np.nonzero(failed)[0]
  labels[ex] = cluster(x[ex], int(s["min_cluster_size"]), int(s["min_samples"]))
  cents, radii = centroids(x[ex], labels[ex], float(s["radius_scale"]))
  rest = np.nonzero(~failed)[0]
  labels[rest] = assign(x[rest], cents, radii)
  probes = probes_of(records, knowledge)
  types = []
  for c in range(len(cents)):
    idx = _ordered(x, labels, c)
    ty = ft.make_type(f"cluster {c}", [probes[i] for i in idx], targets, focus)
    ty.cluster = c
    types.append(ty)
  ft.score_types(types, probes, targets)
  types = [t for t in types if sum(t.failures.values())]
  return ft.rank_types(types, focus), labels


def label_check(records: Sequence[Mapping], labels: np.ndarray,
                labelled_types: Sequence[Mapping] = ()) -> dict:
  """How well the clusters recover the labelled path's types, on the failure
  exemplars: adjusted Rand index against the skill:answer categories
  (`ari_skill_answer`) and against the labelled answer types, whose numeric
  ranges merge answers (`ari_labelled_types`; attribute types left out), each
  with noise exemplars as singletons and over the clustered exemplars alone
  (`..._clustered`)."""
  from sklearn.metrics import adjusted_rand_score  # pylint: disable=import-outside-toplevel
  idx = [i for i, r in enumerate(records) if r["failed"]]
  if not idx:
    return {"exemplars": 0}
  pred = np.asarray(labels)[idx]
  single = np.where(pred >= 0, pred, -1 - np.arange(len(pred)))   # noise: singletons
  cat = [f"{records[i].get('skill') or ft.UNKNOWN_SKILL}: "
         f"{answer_key(records[i]['pseudo_label'])}" for i in idx]
  type_of = {}
  for t in labelled_types:
    if t.get("attribute"):
      continue
    for lab in t.get("labels", ()):
      type_of[(t["skill"], lab)] = t["name"]
  typ = [type_of.get((records[i].get("skill") or ft.UNKNOWN_SKILL,
                      answer_key(records[i]["pseudo_label"])), c)
         for i, c in zip(idx, cat)]
  on = pred >= 0
  nan = float("nan")
  def ari(truth, mask=None):
    truth = np.asarray(truth)
    if mask is None:
      return float(adjusted_rand_score(truth, single))
    return float(adjusted_rand_score(truth[mask], pred[mask])) if mask.sum() > 1 else nan
  return {"exemplars": len(idx), "clusters": int(pred.max()) + 1 if on.any() else 0,
          "noise_fraction": float(1 - on.mean()), "categories": len(set(cat)),
          "labelled_types": len(set(typ)),
          "ari_skill_answer": ari(cat), "ari_skill_answer_clustered": ari(cat, on),
          "ari_labelled_types": ari(typ), "ari_labelled_types_clustered": ari(typ, on)}


def analyse_unlabelled(records: Sequence[Mapping], targets: Sequence[str], focus: str,
                       gaps: Mapping[str, Sequence], m: Mapping, x: np.ndarray, *,
                       knowledge: ft.Knowledge, namers: Sequence[Namer] = (),
                       ask: Ask | None = None, labelled: Mapping | None = None) -> dict:
  """The unlabelled failure types of the mined `records` and, where records
  carry skills, how they compare with the labelled path (`labelled`: the
  result of `analysis.analyse`). `m`: the mine settings (top_k, purity) with
  the unlabelled ones under "unlabelled" (`settings`); `x` [N, D]: the
  records' combined features (`combine` of `Embedder.probes`); `gaps`: each
  target's parsed gap specs; `knowledge`: the world's question attributes
  and truth (`failure_types.Knowledge`). Returns
  {"failure_types": [{..., "cluster", "size", "named_by", "descriptive",
  "candidates"}], "planted_gaps", "planted_gap_recall", "check", "settings"}."""
  s = settings(m.get("unlabelled"))
  x = np.asarray(x, np.float32)
  types, labels = unlabelled_types(records, x, targets, focus, s, knowledge=knowledge)
  by_id = {r["id"]: r for r in records}
  rng = np.random.default_rng(int(s["seed"]))
  named = []
  for rank, t in enumerate(types):
    c = t.cluster
    members = [records[i] for i in _ordered(x, labels, c) if records[i]["failed"]]
    shown = members[:int(s["name_show"])]
    rest = members[int(s["name_show"]):]
    held = [rest[i] for i in sorted(rng.permutation(len(rest))[:int(s["name_members"])])]
    others = np.nonzero(labels != c)[0]
    non = [records[i] for i in sorted(rng.permutation(others)[:int(s["name_nonmembers"])])]
    if rank < int(s["name_top"]):
      info = name_type(shown, held, non, records, namers, ask, float(s["name_margin"]))
    else:
      desc = descriptive_name(members, records)
      info = {"name": desc, "named_by": DESCRIPTIVE, "descriptive": desc, "candidates": []}
    t.name = info["name"]
    named.append({**t.to_json(focus), "cluster": int(c), "size": len(members),
                  "members": [r["id"] for r in members[:8]], **info})
  truth = knowledge.truth_of(by_id)
  planted, found, total = {}, 0, 0
  for tg in targets:
    res = ft.gap_recall(types, tg, list(gaps.get(tg, ())), truth, int(m["top_k"]),
                        float(m["purity"]))
    planted[tg] = res
    found += sum(v["found"] for v in res.values())
    total += len(res)
  focus_gaps = planted.get(focus, {})
  nan = float("nan")
  out = {"failure_types": named, "planted_gaps": planted,
         "planted_gap_recall": (sum(v["found"] for v in focus_gaps.values()) / len(focus_gaps)
                                if focus_gaps else nan),
         "planted_gap_recall_all_targets": found / total if total else nan,
         "clusters": int(labels.max()) + 1 if (labels >= 0).any() else 0,
         "probes_in_types": int((labels >= 0).sum()),
         "named": sum(t["named_by"] != DESCRIPTIVE for t in named),
         "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}}
  if any(r.get("skill") for r in records):
    check = label_check(records, labels, (labelled or {}).get("failure_types", ()))
    if labelled is not None:
      check["planted_gap_recall_labelled"] = labelled.get("planted_gap_recall")
      check["planted_gap_recall_unlabelled"] = out["planted_gap_recall"]
      check["planted_gaps_labelled"] = labelled.get("planted_gaps")
    out["check"] = check
  return out


def mine_unlabelled(records: Sequence[Mapping], targets: Sequence[str], focus: str,
                    gaps: Mapping[str, Sequence], m: Mapping,
                    auditing: rollout_lib.Auditing, build, *, knowledge: ft.Knowledge,
                    labelled: Mapping | None = None, log=print) -> dict:
  """The whole unlabelled path in one call, as the mine stage runs it:
  embed `records` with the round's auditor (`Embedder.from_sampler`;
  `build` = `models.build`), `combine`, `analyse_unlabelled` with the
  configured namers and the round's references. `m`: the mine settings,
  the unlabelled ones under "unlabelled"; `labelled`: `analysis.analyse`'s
  result, for the check."""
  s = settings(m.get("unlabelled"))
  t0 = time.time()
  if not records:
    return {"failure_types": [], "clusters": 0, "settings": dict(s, namers=list(s["namers"]))}
  emb = Embedder.from_sampler(auditing.auditor, build, int(s["batch"]))
  img, txt = emb.probes(records)
  x = combine([img, txt], [float(s["image_weight"]), float(s["text_weight"])], int(s["dims"]),
              int(s["pca_rows"]), int(s["seed"]))
  t1 = time.time()
  out = analyse_unlabelled(records, targets, focus, gaps, m, x, knowledge=knowledge,
                           namers=default_namers(auditing, s), ask=references_ask(auditing),
                           labelled=labelled)
  out["embed_s"], out["wall_s"] = t1 - t0, time.time() - t0
  top = "; ".join(f"{t['name']} ({t['count']}, {t['named_by']})"
                  for t in out["failure_types"][:3])
  chk = out.get("check", {})
  extra = (f"; ARI vs skill:answer {chk['ari_skill_answer']:.3f}, vs labelled types "
           f"{chk['ari_labelled_types']:.3f}" if "ari_skill_answer" in chk else "")
  log(f"mine (unlabelled): {out['clusters']} clusters, {out['named']} named by a model; "
      f"top types of {focus}: {top}; planted-gap recall {out['planted_gap_recall']:.2f}"
      f"{extra}; {out['wall_s']:.0f}s")
  return out
