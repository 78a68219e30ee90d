"""`report` stage: the audit's findings as `report.html` and `report.json`.

Collects what the earlier stages wrote (`audit.json`, `mine.json`, the
exemplar store, `rectify.json`, later rounds under `rounds/`, `stages.json`)
into the facts of `report.html.render` and writes, atomically:

  report.json  {"planted_gap_recall", "exemplar_precision", "label_precision",
                "failure_types": [{"name", "count", "share": {MODEL: f}, ...}],
                "accuracy_before": {MODEL: {SKILL: f, "overall": f}},
                "accuracy_after": {...}, "checks", "rounds", "wall_s": {STAGE: s},
                "unlabelled" (only when mine.json has it): the failure types
                found without skill labels, their names and checks}
  report.html  one self-contained page (inline PNG images, SVG charts, no
               script), which opens from disk.

A missing input (a stage not run) leaves its figures out rather than failing.
`accuracy_after` is the last round's rectified target next to the other models.
"""

from __future__ import annotations

import os
import time

from auditdm_jax import sharding
from auditdm_jax.data import exemplars_tfds as store
from auditdm_jax.eval.benchmark import dumps
from auditdm_jax.report import html
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes.mining import scene_truth
from auditdm_jax.pipeline.layout import published_path, read_summary, round_dirs, write_summary
from auditdm_jax.pipeline.spec import Stage

GALLERY_TYPES, PER_TYPE = 6, 4


def _store_records(path: str, ids: set) -> dict[str, dict]:
  """The exemplar store's records of `ids` (one pass over the split)."""
  src = store.data_source(path, "exemplars")
  by_id = {}
  for j in range(len(src)):
    r = src[j]
    if r["id"] in ids:
      by_id[r["id"]] = r
  return by_id


UNLABELLED_KEYS = ("name", "named_by", "descriptive", "cluster", "size", "count", "probes",
                   "rate", "share", "candidates", "examples", "members")


def _shown(t: dict, n: int) -> list[str]:
  return list(t.get("members") or t.get("examples") or [])[:n]


def unlabelled(workdir: str, mine: dict, per_type: int = PER_TYPE) -> dict | None:
  """The failure types found without labels (`mine.json`'s "unlabelled", from
  `mine.clusters.analyse_unlabelled`), each with up to `per_type` example
  images from the store (its failure exemplars nearest the centroid); None when the
  mine stage wrote none."""
  unl = (mine or {}).get("unlabelled")
  if not unl:
    return None
  types = [{k: t[k] for k in UNLABELLED_KEYS if k in t} for t in unl.get("failure_types", [])]
  path = published_path(workdir)
  by_id = {}
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    by_id = _store_records(path, {i for t in types for i in _shown(t, per_type)})
  for t in types:
    t["gallery"] = [{"id": i, "image": by_id[i]["image"], "question": by_id[i]["question"],
                     "pseudo_label": by_id[i]["pseudo_label"]}
                    for i in _shown(t, per_type) if i in by_id]
  check = unl.get("check") or {}
  out = {"failure_types": types, "clusters": unl.get("clusters"),
         "planted_gap_recall": unl.get("planted_gap_recall"),
         "planted_gaps": unl.get("planted_gaps"), "check": check}
  if "planted_gap_recall_labelled" in check:
    out["labelled_recall"] = check["planted_gap_recall_labelled"]
  return out


def gallery(workdir: str, mine: dict, limit_types: int = GALLERY_TYPES,
            per_type: int = PER_TYPE) -> list[dict]:
  """Exemplars of the top failure types, with the scene world's truth."""
  path = published_path(workdir)
  if not mine or not os.path.exists(os.path.join(path, "dataset_info.json")):
    return []
  want = []
  for t in mine["failure_types"][:limit_types]:
    want += [(i, t["name"]) for i in t.get("examples", [])[:per_type]]
  if not want:
    return []
  by_id = _store_records(path, {i for i, _ in want})
  truth = scene_truth(by_id)
  out = []
  for i, name in want:
    r = by_id.get(i)
    if r is None:
      continue
    t = truth(i)
    texts = [x for x in (r["auditor_text"], r["auditor_text2"]) if x]
    out.append({"id": i, "seed_image": r["seed_image"], "image": r["image"],
                "route": r["pairing"], "auditor_text": " | ".join(texts),
                "question": r["question"], "pseudo_label": r["pseudo_label"],
                "truth": None if t is None else t[2], "category": name,
                "answers": r["answers"], "failed": r["failed"]})
  return out


def run(config, workdir: str) -> dict:
  t0 = time.time()
  if not sharding.is_primary():   # only process 0 reports
    return {}
  audit = read_summary(workdir, "audit", {})
  mine = read_summary(workdir, "mine", {})
  rect = read_summary(workdir, "rectify", {})
  ev = read_summary(workdir, "eval", {})
  walls = read_summary(workdir, "stages", {})
  rounds = []
  for d in [workdir] + round_dirs(workdir):
    r = read_summary(d, "rectify")
    m = read_summary(d, "mine", {})
    a = read_summary(d, "audit", {})
    if r is None:
      continue
    t = r["target"]
    rounds.append({"workdir": d, "target": t,
                   "success_rate": a.get("success_rate"),
                   "planted_gap_recall": m.get("planted_gap_recall"),
                   "exemplars": m.get("exemplars_of", {}).get(t),
                   "accuracy_before": r["accuracy_before"][t],
                   "accuracy_after": r["accuracy_after"][t], "checks": r["checks"]})
  before = rect.get("accuracy_before") or {
      n: e["accuracy"] for n, e in ev.get("models", {}).items() if e.get("role") != "auditor"}
  after = None
  if rect:
    last = read_summary(rounds[-1]["workdir"], "rectify") if rounds else rect
    after = dict(rect["accuracy_after"])
    after[rect["target"]] = last["accuracy_after"][last["target"]]
  gapped = {n: sorted({gaps_lib.GapSpec.parse(g).skill for g in s.get("gaps", ())})
            for n, s in config.models.items() if s.role == "target"}
  failure_types = [{k: t[k] for k in ("name", "count", "share", "rate", "probes")}
                   for t in mine.get("failure_types", [])]
  facts = {
      "title": f"AuditDM report: {mine.get('target') or audit.get('target') or 'audit'}",
      "workdir": workdir,
      "planted_gap_recall": mine.get("planted_gap_recall"),
      "exemplar_precision": mine.get("exemplar_precision"),
      "label_precision": mine.get("label_precision"),
      "search_trained": (audit.get("success_rate") or {}).get("trained"),
      "search_warm_start": (audit.get("success_rate") or {}).get("warm_start"),
      "search_per_seed_trained": (audit.get("success_rate_per_seed") or {}).get("trained"),
      "search_per_seed_warm_start": (audit.get("success_rate_per_seed") or {}).get(
          "warm_start"),
      "top_question_share": _mined_top_share(mine, audit),
      "planted_gaps": mine.get("planted_gaps"),
      "failure_types": failure_types,
      "accuracy_before": before, "accuracy_after": after, "gapped_skills": gapped,
      "learning_curve": audit.get("learning_curve", []),
      "wall_s": walls,
      "notes": _notes(audit, mine, rect, rounds),
  }
  items = gallery(workdir, mine)
  unl = unlabelled(workdir, mine)
  if unl is not None:
    facts["unlabelled"] = unl
  html_path = os.path.join(workdir, "report.html")
  html.write(html_path, facts, items)
  out = {"planted_gap_recall": mine.get("planted_gap_recall"),
         "exemplar_precision": mine.get("exemplar_precision"),
         "label_precision": mine.get("label_precision"),
         "failure_types": failure_types, "accuracy_before": before,
         "accuracy_after": after, "checks": rect.get("checks", []),
         "rounds": [{k: v for k, v in r.items() if k != "workdir"} for r in rounds],
         "search_success_rate": audit.get("success_rate"),
         "search_success_rate_per_seed": audit.get("success_rate_per_seed"),
         "diversity": audit.get("diversity"),
         "gallery": [{k: v for k, v in g.items() if k not in ("seed_image", "image")}
                     for g in items],
         "wall_s": dict(walls, report=time.time() - t0), "html": html_path}
  if unl is not None:   # only where the mine stage found types without labels
    out["unlabelled"] = dict(unl, failure_types=[
        {k: v for k, v in t.items() if k != "gallery"} for t in unl["failure_types"]])
  write_summary(workdir, "report", dumps(out))
  print(f"report: {html_path} ({len(failure_types)} failure types, {len(items)} exemplars "
        "in the gallery)", flush=True)
  return out


def _mined_top_share(mine: dict, audit: dict):
  """The most common question's share of the mined probes (the first mined
  auditor's, mine.json `diversity`), else of the audit's per-seed probes."""
  for d in (mine.get("diversity") or {}).values():
    return d.get("top_question_share")
  return ((audit.get("diversity") or {}).get("trained") or {}).get("top_question_share")


def _f(x) -> str:
  return f"{x:.3f}" if isinstance(x, (int, float)) else "n/a"


def _notes(audit: dict, mine: dict, rect: dict, rounds: list) -> list[str]:
  notes = []
  if audit:
    sr = audit.get("success_rate", {})
    notes.append(f"Search success at a budget of {audit.get('budget')} samples: trained "
                 f"{_f(sr.get('trained'))}, warm start {_f(sr.get('warm_start'))}.")
    ps = audit.get("success_rate_per_seed")
    if ps:
      seeds = (audit.get("search") or {}).get("seeds")
      notes.append(f"Per seed image ({ps.get('budget')} probes on each of {seeds} "
                   f"held-out seeds, the paper's count): trained {_f(ps.get('trained'))}, "
                   f"warm start {_f(ps.get('warm_start'))}.")
    div = (audit.get("diversity") or {}).get("trained")
    if div:
      notes.append(f"The trained auditor's most common question is "
                   f"{_f(div.get('top_question_share'))} of its probes "
                   f"({div.get('distinct_questions')} distinct questions, "
                   f"{div.get('failure_categories')} failure categories).")
  if mine:
    notes.append(f"{mine.get('probes')} consensus-backed probes, {mine.get('exemplars')} "
                 f"failure exemplars; pseudo-labels equal the ground truth in "
                 f"{_f(mine.get('label_precision'))} of the audited target's exemplars.")
  if rect:
    met = sum(c["ok"] for c in rect.get("checks", []))
    what = (f"skipped ({rect['skipped']})" if rect.get("skipped") else
            f"{met}/{len(rect.get('checks', []))} checks met")
    notes.append(f"Rectification ({rect.get('strategy')}, {rect.get('pseudo_labelled_rows')} "
                 f"pseudo-labelled rows) in round 1: {what}; {len(rounds)} round(s) in all.")
  return notes


STAGE = Stage(
    name="report", run=run, reads="everything above", writes="`report.html`, `report.json`")
