"""`rectify` stage: fine-tune the target on its mined exemplars, then measure it.

Training data, by `rectify.strategy` (the paper's two uses of the auditor):

  augment    the target's own labelled training data (the scene `train`
             split, with its planted gaps applied as in its training; or the
             real configs' `data.rectify_train` dataset) mixed
             with its failure exemplars (question -> reference consensus on
             the image it failed on) at `mix_ratio` exemplar rows per row;
             with `anchor_ratio` > 0 that share of the exemplar rows are
             anchors instead (`anchor_sources`: consensus-backed probes of
             the exemplars' skills on which every target agreed), so the
             healthy part of a repaired skill stays in place; with
             `skill_balance` p > 0 the exemplars' skills get shares
             proportional to n_s ** (1 - p) (`skill_weights`);
  bootstrap  no labelled data: every consensus-backed probe of the store
             (failure exemplars and pseudo-labelled probes) is the training
             set, labelled by the references alone.

In round r > 1 the exemplars of every earlier round are added
(`earlier_stores`), so a round does not undo an earlier repair (measured:
without them round 2 took colour 0.936 -> 0.864). No human or ground-truth
label enters either set. The mix is a Grain pipeline
(`data.loaders.MixedSource` under `train_loader`) feeding the sharded
trainer (`train.sft`: Orbax checkpoints in `<workdir>/rectify/<target>/`,
resumed on restart; `freeze_vision` freezes the SigLIP tower). The rectified
target is saved as `<workdir>/models/<target>_rectified` and every answering
model is measured on the benchmark, before and after, into
`<workdir>/rectify.json`:

  {"target", "rectified", "strategy", "accuracy_before": {MODEL: {SKILL, "overall"}},
   "accuracy_after": {...}, "gap_accuracy_before" / "_after",
   "gains": {"slices": {SPEC: gain}, "skills": {SKILL: gain},
             "gap_share_of_skill": {SKILL: share}}, "checks", "wall_s", ...}
with the repair checks of `checks` (every gap slice +40 points, a gapped skill
+20 where its gap slices hold a fifth of its questions, healthy skills -2 at
most, 1 point above the other targets overall).

With named benchmarks (`data.benchmarks`, the real configs) each benchmark is
scored with its declared metric in the paper's unit (VQA accuracy in %,
CIDEr x 100, MME as a sum; `pipeline.evaluation.evaluate_workdir_named`):

  {"target", "rectified", "strategy", "benchmarks": {BENCH: {"metric", "unit"}},
   "benchmarks_before": {MODEL: {BENCH: {"metric", "unit", "score", ...details}}},
   "benchmarks_after": {...}, "gain": {BENCH: {"metric", "unit", "before", "after",
   "gain"}} (the target), "accuracy_before" / "_after": {MODEL: {BENCH: score / 100}}
   (the report's table), "checks": the target's gain on each benchmark > 0, ...}

The predictions journal (`eval/predictions.py`) keeps every answer by the
weights' fingerprint, so the eval stage's figures of the same models are
these, without a second pass.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from auditdm_jax import models, sharding
from auditdm_jax.data import exemplars_tfds as store
from auditdm_jax.data import loaders
from auditdm_jax.eval import benchmark
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes.questions import SKILLS
from auditdm_jax.data import named
from auditdm_jax.pipeline import evaluation, layout, placement
from auditdm_jax.pipeline.layout import (audit_target, earlier_stores, model_dir, published_path,
                                         rectified_name, roles)
from auditdm_jax.pipeline.recipes import OPTIM_DEFAULTS, recipe_config
from auditdm_jax.pipeline.spec import Stage, unknown_keys
from auditdm_jax.scenes import tasks
from auditdm_jax.train import sft

STRATEGIES = ("augment", "bootstrap")
# The optimizer: OPTIM_DEFAULTS (pipeline/recipes.py) but for rectify's own
# departures written here.
DEFAULTS = dict(target="", strategy="augment", mix_ratio=0.5, anchor_ratio=0.0,
                skill_balance=0.0, freeze_vision=True, seq_len=32,
                steps=300, batch=32, lr=5e-4, warmup=0.1, end_lr=1e-5,
                weight_decay=OPTIM_DEFAULTS["weight_decay"], checkpoint_every=100, log_every=50)
# The repair checks (issue 31): every gap slice +40 points; a gapped skill +20
# where its gap holds at least a fifth of the skill's questions; no healthy
# skill down more than 2 points; the rectified target 1 point above the others.
SLICE_GAIN, GAIN, SKILL_GAIN_SHARE = 0.40, 0.20, 0.2
HEALTHY_COST, OVERALL_MARGIN = 0.02, 0.01


def _resolve(config, r: dict) -> dict:
  """Refuses a strategy or ratio out of range, by key."""
  del config
  if r["strategy"] not in STRATEGIES:
    raise ValueError(f"rectify.strategy must be one of {STRATEGIES}, got {r['strategy']!r}")
  if not 0.0 < float(r["mix_ratio"]) <= 1.0:
    raise ValueError(f"rectify.mix_ratio must be in (0, 1], got {r['mix_ratio']!r}")
  if not 0.0 <= float(r["anchor_ratio"]) < 1.0:
    raise ValueError(f"rectify.anchor_ratio must be in [0, 1), got {r['anchor_ratio']!r}")
  if not 0.0 <= float(r["skill_balance"]) <= 1.0:
    raise ValueError(f"rectify.skill_balance must be in [0, 1], got {r['skill_balance']!r}")
  return r


class Subset:
  """Records `indices` of a random-access source (picklable)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[int(self.indices[i])]


def pseudo_sources(path: str, target: str, strategy: str) -> list[Subset]:
  """The consensus-labelled records to train on: the target's failure
  exemplars (augment), or every consensus-backed probe (bootstrap)."""
  out = []
  for split in ("exemplars",) + (("pseudo_labelled",) if strategy == "bootstrap" else ()):
    src = store.data_source(path, split)
    keep = [i for i in range(len(src))
            if strategy == "bootstrap" or target in src[i]["failed"]]
    out.append(Subset(src, keep))
  return out


def anchor_sources(paths, exemplars) -> list[Subset]:
  """Anchors for `augment`: the consensus-backed probes on which every target
  agreed with the references (`pseudo_labelled`), of the question skills
  (`skill`, read from the question text when mined) that the exemplars
  have. They keep the healthy part of a repaired skill in place: exemplars
  of one failing slice alone (e.g. only large counts) pull the answers of
  the rest of the skill towards it. Labels are the reference consensus."""
  skills = {s.source[int(i)]["skill"] for s in exemplars for i in s.indices}
  out = []
  for p in paths:
    src = store.data_source(p, "pseudo_labelled")
    out.append(Subset(src, [i for i in range(len(src)) if src[i]["skill"] in skills]))
  return out


def skill_weights(subsets, power: float) -> tuple[list[Subset], list[float]]:
  """`subsets` split by their records' `skill`, with weights (summing to 1)
  that give skill s a share proportional to n_s ** (1 - power) (n_s: its records
  over all subsets): 0 keeps the records' own proportions, 1 gives every
  skill the same share (temperature sampling, as multilingual mixtures
  do). A skill with few exemplars (a colour among counts) is then not
  drowned by the biggest failure skill."""
  if power == 0:
    total = sum(len(s) for s in subsets)
    return list(subsets), [len(s) / total for s in subsets]
  parts, skill_of = [], []
  for sub in subsets:
    by: dict[str, list[int]] = {}
    for i in sub.indices:
      by.setdefault(sub.source[int(i)]["skill"], []).append(int(i))
    for k in sorted(by):
      parts.append(Subset(sub.source, by[k]))
      skill_of.append(k)
  n = {k: sum(len(p) for p, q in zip(parts, skill_of) if q == k) for k in set(skill_of)}
  mass = {k: float(v) ** (1.0 - power) for k, v in n.items()}
  total = sum(mass.values())
  weights = [mass[k] / total * len(p) / n[k] for p, k in zip(parts, skill_of)]
  return parts, weights


def _fits(task: tasks.RectifyTask, src: Subset) -> Subset:
  """Drops records whose question + pseudo-label exceed the task's seq_len."""
  keep = []
  for i in range(len(src)):
    try:
      task(src[i])
      keep.append(i)
    except ValueError:
      pass
  return Subset(src.source, src.indices[keep])


def accuracy(config, workdir: str, name: str, model, bench, gaps) -> dict:
  rep = evaluation.cached_report(workdir, model, bench, gaps, config=config, name=name)
  return {"accuracy": rep["accuracy"], "gap_accuracy": rep["gap_accuracy"]}


def gap_shares(bench, gaps: list[str]) -> dict[str, float]:
  """Each gapped skill's share of its benchmark questions that lie in a gap slice."""
  out = {}
  skills = np.array([r["skill"] for r in bench])
  for spec in gaps_lib.parse_gaps(list(gaps)):
    in_skill = skills == spec.skill
    inside = gaps_lib.gap_mask(bench, spec) & in_skill
    prev = out.get(spec.skill, 0.0)
    out[spec.skill] = prev + (float(inside.sum() / in_skill.sum()) if in_skill.any() else 0.0)
  return out


def checks(target: str, gaps: list[str], before: dict, after: dict, others: list[str],
           gap_before: dict | None = None, gap_after: dict | None = None,
           shares: dict | None = None) -> list:
  """The repair checks (issue 31): every gap slice of `target` gains >= SLICE_GAIN;
  a gapped skill gains >= GAIN where its gap slices hold at least
  SKILL_GAIN_SHARE of the skill's benchmark questions (`shares`; without
  them, every gapped skill); no healthy skill loses more than HEALTHY_COST;
  the rectified target's overall beats each other target's by OVERALL_MARGIN."""
  gapped = sorted({gaps_lib.GapSpec.parse(g).skill for g in gaps})
  out = []
  a0, a1 = before[target], after[target]
  for g in (gaps if gap_before is not None and gap_after is not None else ()):
    gain = gap_after[target][g] - gap_before[target][g]
    out.append({"check": f"gap slice {g} gain", "value": gain, "target": f">= {SLICE_GAIN}",
                "ok": bool(gain >= SLICE_GAIN)})
  for s in gapped:
    if shares is not None and shares.get(s, 0.0) < SKILL_GAIN_SHARE:
      continue      # one answer of seven: the slice's gain is the check
    gain = a1[s] - a0[s]
    out.append({"check": f"gapped skill {s} gain", "value": gain, "target": f">= {GAIN}",
                "ok": bool(gain >= GAIN)})
  for s in SKILLS:
    if s in gapped:
      continue
    cost = a0[s] - a1[s]
    out.append({"check": f"healthy skill {s} cost", "value": cost,
                "target": f"<= {HEALTHY_COST}", "ok": bool(cost <= HEALTHY_COST)})
  for o in others:
    margin = a1["overall"] - after[o]["overall"]
    out.append({"check": f"overall vs {o}", "value": margin,
                "target": f">= {OVERALL_MARGIN}", "ok": bool(margin >= OVERALL_MARGIN - 1e-9)})
  return out


def _train(config, workdir: str, r: dict, target: str, model, task, pseudo, n_pseudo: int,
           anchors=()):
  """Fine-tunes `model` on the mix; returns (rectified VLM, training summary)."""
  seed = int(config.seed)
  cfg = model.config
  pseudo = [s for s in pseudo if len(s)]
  anchors = [s for s in anchors if len(s)]
  if r["strategy"] == "augment":
    orig = labelled_source(config, workdir, cfg.vision.image_size)
    ratio = float(r["mix_ratio"])
    a = float(r["anchor_ratio"]) if anchors else 0.0
    n_anchor = sum(len(s) for s in anchors)
    pseudo, w_pseudo = skill_weights(pseudo, float(r["skill_balance"]))
    sources = [orig] + pseudo + anchors
    weights = ([1.0 - ratio] + [ratio * (1 - a) * w for w in w_pseudo]
               + [ratio * a * len(s) / n_anchor for s in anchors])
    if ratio == 1.0:
      sources, weights = sources[1:], weights[1:]
  else:
    sources, weights = pseudo, [len(s) / n_pseudo for s in pseudo]
  mixed = loaders.MixedSource(sources, weights, seed=seed)
  it = loaders.train_loader(mixed, batch_size=loaders.process_batch(int(r["batch"])),
                            seed=seed + 4242, transforms=[task], shard_mode="batch_rows",
                            worker_count=int(config.get("world", {}).get("loader_workers", 0)))
  rc = dict(r, frozen=("^img/",) if r["freeze_vision"] else ())
  tcfg = placement.placed(recipe_config(rc, seed + 4242), config, target)
  params, summary = sft.train(cfg, jax.tree.map(np.asarray, model.params), it, tcfg,
                              os.path.join(workdir, "rectify", target),
                              tokenizer=model.tokenizer)
  return models.VLM(cfg, sharding.to_host(params), model.tokenizer), summary



def labelled_source(config, workdir: str, image_size: int):
  """The target's original labelled data that `augment` mixes in: the named
  `data.rectify_train` dataset, else the scene world's train split."""
  spec = config.get("data", {}).get("rectify_train", None)
  if spec:
    return named.open_source(dict(spec), image_size)
  if "world" not in config:
    raise ValueError("rectify.strategy 'augment' needs labelled data: name it in "
                     "data.rectify_train, or use the 'bootstrap' strategy")
  return layout.scene_source(config, workdir, "train")


def run(config, workdir: str) -> dict:
  t0 = time.time()
  real = bool(config.get("data", {}).get("benchmarks", None))
  if "audit" not in config or not ("world" in config or real):
    print("rectify: this config has no `audit` section, or neither a scene world nor "
          "named benchmarks; nothing to rectify", flush=True)
    return {}
  r = STAGE.settings(config)
  target = r["target"] or audit_target(config)
  if config.models.get(target, None) is None or config.models[target].role != "target":
    raise ValueError(f"rectify.target {target!r} is not a model with role 'target'")
  spec = config.models[target]
  path = published_path(workdir)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"rectify: no exemplar store at {path}; run the mine stage first")
  model = models.load(model_dir(workdir, target))
  gaps = [str(g) for g in gaps_lib.parse_gaps(list(spec.get("gaps", ())))]
  task = tasks.RectifyTask(model.config, model.tokenizer, int(r["seq_len"]), gaps=gaps,
                           gap_mode=str(spec.get("gap_mode", "corrupt")))
  stores = [path] + earlier_stores(workdir)
  pseudo = [_fits(task, s) for p in stores for s in pseudo_sources(p, target, r["strategy"])]
  n_pseudo = sum(len(s) for s in pseudo)
  anchors = []
  if r["strategy"] == "augment" and float(r["anchor_ratio"]) > 0 and n_pseudo:
    anchors = [_fits(task, s) for s in anchor_sources(stores, pseudo)]
  n_anchor = sum(len(s) for s in anchors)
  skipped = ""
  if n_pseudo == 0:
    # Nothing was found (or nothing fits seq_len): the target stays as it is.
    # Not an error: a weak auditor can find nothing, and a later round may.
    skipped = (f"the exemplar store at {path} holds no usable exemplar of {target} "
               f"(strategy {r['strategy']!r}); {target} is not rectified")
    print(f"rectify: {skipped}", flush=True)
    rect, summary = model, {"steps": 0, "resumed": False, "final": {}, "wall_s": 0.0}
  else:
    rect, summary = _train(config, workdir, r, target, model, task, pseudo, n_pseudo,
                           anchors)
  out_name = rectified_name(target)
  if not skipped:
    rect.save(model_dir(workdir, out_name))

  t_eval = time.time()
  if real:
    return _report_named(config, workdir, r, target, out_name, skipped, n_pseudo, summary,
                         t0, t_eval)
  bench_src = layout.scene_source(config, workdir, "benchmark")
  bench = [bench_src[i] for i in range(len(bench_src))]
  before, after, gap_before, gap_after = _before_after(config, workdir, target, model, rect,
                                                       bench)
  others = [t for t in roles(config, "target") if t != target]
  shares = gap_shares(bench, gaps)
  gains = {"slices": {g: gap_after[target][g] - gap_before[target][g] for g in gaps},
           "skills": {s: after[target][s] - before[target][s] for s in sorted(shares)},
           "gap_share_of_skill": shares}
  out = {"target": target, "rectified": "" if skipped else out_name, "skipped": skipped,
         "strategy": r["strategy"],
         "mix_ratio": float(r["mix_ratio"]), "freeze_vision": bool(r["freeze_vision"]),
         "pseudo_labelled_rows": n_pseudo, "anchor_ratio": float(r["anchor_ratio"]),
         "anchor_rows": n_anchor, "gaps": gaps,
         "gapped_skills": sorted({gaps_lib.GapSpec.parse(g).skill for g in gaps}),
         "accuracy_before": before, "accuracy_after": after,
         "gap_accuracy_before": gap_before, "gap_accuracy_after": gap_after,
         "gains": gains,
         "checks": [] if skipped else checks(target, gaps, before, after, others,
                                             gap_before, gap_after, shares),
         "train": {k: summary[k] for k in ("steps", "resumed", "final", "wall_s")},
         "eval_s": time.time() - t_eval, "wall_s": time.time() - t0}
  if sharding.is_primary():
    layout.write_summary(workdir, "rectify", benchmark.dumps(out))
  _log(out, summary)
  return out


def _before_after(config, workdir: str, target: str, model, rect, bench):
  """Every answerer's (overall and per-skill, gap-slice) accuracy on the scene
  benchmark before and after: only `target` changes, to `rect`."""
  before, after, gap_before, gap_after = {}, {}, {}, {}
  for name in roles(config, "target") + roles(config, "reference"):
    g = [str(x) for x in gaps_lib.parse_gaps(list(config.models[name].get("gaps", ())))]
    m = model if name == target else models.load(model_dir(workdir, name))
    rep = accuracy(config, workdir, name, m, bench, g)
    before[name], gap_before[name] = rep["accuracy"], rep["gap_accuracy"]
    if name == target:
      rep = accuracy(config, workdir, rectified_name(target), rect, bench, g)
    after[name], gap_after[name] = rep["accuracy"], rep["gap_accuracy"]
  return before, after, gap_before, gap_after


def _log(out: dict, summary: dict) -> None:
  target, gaps = out["target"], out["gaps"]
  a0, a1 = out["accuracy_before"][target], out["accuracy_after"][target]
  g0, g1 = out["gap_accuracy_before"][target], out["gap_accuracy_after"][target]
  print(f"rectify: {target} ({out['strategy']}, {out['pseudo_labelled_rows']} pseudo-labelled "
        f"rows, {summary['steps']} steps): overall {a0['overall']:.3f} -> {a1['overall']:.3f}; "
        + ", ".join(f"{s} {a0[s]:.3f} -> {a1[s]:.3f}" for s in out["gapped_skills"])
        + "; gap slices " + ", ".join(f"{g} {g0[g]:.3f} -> {g1[g]:.3f}" for g in gaps)
        + f"; {sum(c['ok'] for c in out['checks'])}/{len(out['checks'])} checks met; "
        f"{out['wall_s']:.0f}s", flush=True)


def _report_named(config, workdir, r, target, out_name, skipped, n_pseudo, summary, t0,
                  t_eval) -> dict:
  """rectify.json of a run on named benchmarks: every benchmark's metric (in
  the paper's unit) for every answering model before, and for the target
  after. The predictions journal makes the "before" free for the eval stage
  (and a rerun's "before" free here)."""
  answerers = roles(config, "target") + roles(config, "reference")
  benches = evaluation.benchmark_records(config)   # read once for both
  units = evaluation.benchmark_units(config)
  before = evaluation.evaluate_workdir_named(config, workdir, answerers, benches=benches)
  after = dict(before)
  if not skipped:
    after.update(evaluation.evaluate_workdir_named(config, workdir, [target], benches=benches,
                                         swap={target: model_dir(workdir, out_name)}))
  gains = {}
  for b, u in units.items():
    s0 = before[target]["benchmarks"][b]["score"]
    s1 = after[target]["benchmarks"][b]["score"]
    gains[b] = {**u, "before": s0, "after": s1, "gain": s1 - s0}
  out = {"target": target, "rectified": "" if skipped else out_name, "skipped": skipped,
         "strategy": r["strategy"], "mix_ratio": float(r["mix_ratio"]),
         "freeze_vision": bool(r["freeze_vision"]), "pseudo_labelled_rows": n_pseudo,
         "gaps": [], "gapped_skills": [], "benchmarks": units,
         "benchmarks_before": {n: v["benchmarks"] for n, v in before.items()},
         "benchmarks_after": {n: v["benchmarks"] for n, v in after.items()},
         "gain": gains,
         "accuracy_before": {n: v["accuracy"] for n, v in before.items()},
         "accuracy_after": {n: v["accuracy"] for n, v in after.items()},
         "checks": [] if skipped else [
             {"check": f"{b} gain ({g['metric']}, {g['unit']})", "value": g["gain"],
              "target": "> 0", "ok": bool(g["gain"] > 0)} for b, g in gains.items()],
         "train": {k: summary[k] for k in ("steps", "resumed", "final", "wall_s")},
         "eval_s": time.time() - t_eval, "wall_s": time.time() - t0}
  if sharding.is_primary():
    layout.write_summary(workdir, "rectify", benchmark.dumps(out))
  print(f"rectify: {target} ({r['strategy']}, {n_pseudo} pseudo-labelled rows, "
        f"{summary['steps']} steps): " + "; ".join(
            f"{b} {g['metric']} {g['before']:.2f} -> {g['after']:.2f} ({g['unit']})"
            for b, g in gains.items()) + f"; {out['wall_s']:.0f}s", flush=True)
  return out


def problems(config) -> list[str]:
  given = dict(config.get("rectify", {}))
  problems = unknown_keys("rectify", given, DEFAULTS)
  try:
    r = STAGE.settings(config)
  except ValueError as e:
    return problems + [str(e)]
  t = r["target"]
  if t and (t not in config.models or config.models[t].get("role", "") != "target"):
    problems.append(f"rectify.target {t!r} is not a model with role 'target'")
  for key in ("steps", "batch", "seq_len", "checkpoint_every", "log_every"):
    v = r[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      problems.append(f"rectify.{key} must be an int >= 1, got {v!r}")
  if not isinstance(r["lr"], (int, float)) or not r["lr"] > 0:
    problems.append(f"rectify.lr must be > 0, got {r['lr']!r}")
  return problems


STAGE = Stage(
    name="rectify", run=run,
    reads="exemplar store, labelled data (`data/` train split, or `data.rectify_train`), "
          "benchmarks, config (`rectify`)",
    writes="`rectify/<target>/` (training run), `models/<target>_rectified/`, `rectify.json` "
           "(accuracy before / after, checks), `eval_cache/`",
    section="rectify", defaults=DEFAULTS, resolve=_resolve, problems=problems,
    needs=("audit", "models"),
    in_rounds=True)
