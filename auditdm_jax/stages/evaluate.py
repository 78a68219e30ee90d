"""`eval` stage: per-skill accuracy of every answering model on the held-out
scene benchmark, and the auditor's well-formed-output rates; or, when the
config names benchmarks (`data.benchmarks`, the real configs), every target
and reference scored on each with the benchmark's declared metric
(`eval/metrics/`: VQA accuracy, exact match, ANLS, relaxed accuracy,
multiple choice, CircularEval, POPE, MME, RefCOCO Acc@0.5, CIDEr) in the
paper's unit; `eval.max_examples` caps each benchmark.

Writes `<workdir>/eval.json`:
  {"models": {NAME: {"role", "gaps": [SPEC...], "accuracy": {SKILL: acc, "overall": acc},
                     "gap_accuracy": {SPEC: acc}, "healthy": {SKILL: acc}, ...}},
   "checks": [{"model", "check", "value", "target", "ok"}], "benchmark": {...}}
For the auditor, "accuracy" holds the fraction of well-formed outputs per
route it was warm-started on (`pretrain.auditor.routes`; question / edit /
caption) and overall: what the warm start is trained to do; once the audit
stage has run, the GRPO-trained auditor (`<auditor>_trained`) is evaluated
too, under that name. The checks are the scene world's targets
(docs/scene_world.md):
references >= 0.95 overall and >= 0.85 on every skill; each target >= 0.85 on
every skill without a planted gap and, on each gap slice, at most 0.6 times
its mean accuracy on the healthy skills. A miss is reported, not raised.
Answerer reports are cached by weights (`cached_report`): what rectify
measured is not measured again.

With named benchmarks `eval.json` is
  {"models": {NAME: {"role", "benchmarks": {BENCH: {"metric", "unit", "score",
                     "count", ...the metric's details, "records"}},
                     "accuracy": {BENCH: score / 100}, "examples": {BENCH: [...]}}},
   "benchmarks": {BENCH: {"metric", "unit", "records"}}, "checks": [], "wall_s"}
and the answers come from the per-sample predictions journal
(`pipeline.evaluation.evaluate_workdir_named`): a restart after a crash or SIGTERM
predicts only what is missing, and rectify's predictions of the same weights
are reused.
"""

from __future__ import annotations

import os
import time

import numpy as np

from auditdm_jax import sharding
from auditdm_jax.eval import benchmark
from auditdm_jax.scenes import benchmark as scene_benchmark
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes.questions import SKILLS
from auditdm_jax.data import named
from auditdm_jax.pipeline import evaluation, layout, placement, sections
from auditdm_jax.pipeline.evaluation import cached_report, records
from auditdm_jax.pipeline.layout import model_dir
from auditdm_jax.pipeline.spec import Stage

# The scene world's checks (issue 31): references >= 0.95 overall and >= 0.85 on
# every skill; each target >= 0.85 on every healthy skill and each gap slice at
# most 0.6 of its healthy mean.
REFERENCE_OVERALL, REFERENCE_SKILL = 0.95, 0.85
TARGET_HEALTHY, GAP_RATIO = 0.85, 0.6


def checks_for(name: str, role: str, gaps: list[str], rep: dict) -> list[dict]:
  out = []
  acc = rep["accuracy"]
  def add(check, value, target, ok):
    out.append({"model": name, "check": check, "value": value, "target": target,
                "ok": bool(ok)})
  if role == "reference":
    add("overall", acc["overall"], f">= {REFERENCE_OVERALL}", acc["overall"] >= REFERENCE_OVERALL)
    for s in SKILLS:
      add(f"skill {s}", acc[s], f">= {REFERENCE_SKILL}", acc[s] >= REFERENCE_SKILL)
  elif role == "target":
    gapped = {gaps_lib.GapSpec.parse(g).skill for g in gaps}
    healthy = [s for s in SKILLS if s not in gapped]
    for s in healthy:
      add(f"healthy skill {s}", acc[s], f">= {TARGET_HEALTHY}", acc[s] >= TARGET_HEALTHY)
    mean_healthy = float(np.mean([acc[s] for s in healthy])) if healthy else float("nan")
    for g, v in rep["gap_accuracy"].items():
      limit = GAP_RATIO * mean_healthy
      add(f"gap {g}", v, f"<= {GAP_RATIO} x healthy mean = {limit:.3f}", v <= limit)
  return out


def _run_named(config, workdir: str, t0: float) -> dict:
  answerers = sorted(n for n, s in config.models.items() if s.role in layout.ANSWERER_ROLES)
  benches = evaluation.benchmark_records(config)
  res = evaluation.evaluate_workdir_named(config, workdir, answerers, benches=benches)
  units = evaluation.benchmark_units(config)
  out = {"models": {n: {"role": config.models[n].role, **res[n]} for n in answerers},
         "checks": [],
         "benchmarks": {b: dict(units[b], records=len(benches[b])) for b in sorted(units)}}
  for n in answerers:
    print(f"eval: {n:13s} " + "  ".join(
        f"{b} {r['metric']} {r['score']:.2f} ({r['unit']})"
        for b, r in res[n]["benchmarks"].items()), flush=True)
  out["wall_s"] = time.time() - t0
  if sharding.is_primary():
    layout.write_summary(workdir, "eval", benchmark.dumps(out))
  return out


def run(config, workdir: str) -> dict:
  t0 = time.time()
  if config.get("data", {}).get("benchmarks", None):
    return _run_named(config, workdir, t0)
  if "world" not in config:
    print("eval: this config names no scene-world benchmark; nothing to evaluate", flush=True)
    return {}
  layout.ensure_data(config, workdir)
  bench = records(layout.scene_source(config, workdir, "benchmark"))
  n_aud = int(STAGE.settings(config)["auditor_samples"])
  out = {"models": {}, "checks": [],
         "benchmark": {"records": len(bench),
                       "per_skill": {s: sum(r["skill"] == s for r in bench) for s in SKILLS}}}
  entries = []
  for name, spec in sorted(config.models.items()):
    entries.append((name, spec))
    trained = layout.trained_name(name)
    if spec.role == "auditor" and os.path.exists(model_dir(workdir, trained)):
      entries.append((trained, spec))    # the audit stage's GRPO-trained auditor
  for name, spec in entries:
    model = layout.load_model(workdir, name, "eval")
    gaps = [str(g) for g in gaps_lib.parse_gaps(list(spec.get("gaps", ())))]
    t1 = time.time()
    if spec.role == "auditor":
      routes = config.get("pretrain", {}).get("auditor", {}).get("routes", None)
      rep = scene_benchmark.evaluate_auditor(model, bench[:n_aud], seed=int(config.seed),
                                       routes=routes,
                                       sampler=placement.sampler(config, name, model))
      entry = {"role": "auditor", "gaps": [], "accuracy": rep["validity"],
               "gap_accuracy": {}, "examples": rep["examples"]}
    else:
      rep = cached_report(workdir, model, bench, gaps, config=config, name=name)
      entry = {"role": spec.role, "gaps": gaps, **rep}
    entry["wall_s"] = time.time() - t1
    out["models"][name] = entry
    out["checks"] += checks_for(name, spec.role, gaps, entry)
    acc = entry["accuracy"]
    line = " ".join(f"{k}={v:.3f}" for k, v in acc.items())
    print(f"eval: {name:13s} {spec.role:9s} {line}", flush=True)
    for g, v in entry["gap_accuracy"].items():
      print(f"eval: {name:13s} gap {g}: {v:.3f}", flush=True)
  failed = [c for c in out["checks"] if not c["ok"]]
  for name in out["models"]:
    missed = [c for c in failed if c["model"] == name]
    if missed:
      print(f"eval: {name} missed {len(missed)} check(s): " + "; ".join(
          f"{c['check']} {c['value']:.3f} (target {c['target']})" for c in missed),
          flush=True)
  print(f"eval: {len(out['checks']) - len(failed)}/{len(out['checks'])} checks met", flush=True)
  out["wall_s"] = time.time() - t0
  if sharding.is_primary():
    layout.write_summary(workdir, "eval", benchmark.dumps(out))
  return out


def problems(config) -> list[str]:
  """Every named benchmark declares a metric data/named.py knows (the
  dataset's own problems are the config check's data section)."""
  out = []
  for name, spec in dict(config.get("data", {}).get("benchmarks", {}) or {}).items():
    metric = spec.get("metric", "") if hasattr(spec, "get") else ""
    if not metric:
      out.append(f"data.benchmarks.{name} declares no metric; give it one of "
                 f"{sorted(named.METRIC_FIELDS)} (e.g. metric='vqa' for VQAv2)")
  return out


STAGE = Stage(
    name="eval", run=run,
    reads="`models/` (with `<auditor>_trained/` when audited), `data/` benchmark, or "
          "`data.benchmarks`",
    writes="`eval.json` (scene: per-skill accuracy, gap slices, checks; named benchmarks: "
           "each benchmark's metric in the paper's unit), `eval_cache/` (answerer reports "
           "and per-sample predictions keyed by weights, shared with rectify)",
    section="eval", defaults=sections.EVAL, problems=problems)
