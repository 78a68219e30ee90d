"""`mine` stage: the trained auditor's probes -> an exemplar store and failure types.

One pass of each auditor checkpoint in `mine.auditors` (default: the trained
auditor) over the seed images: `samples_per_seed` samples per seed, pairings
drawn from the mixture, every target and reference answering. A probe is
kept when it is well formed and the references reach a consensus; it is a
failure *exemplar* of every target whose answer differs from that consensus
(`exemplars` split), otherwise a pseudo-labelled example (`pseudo_labelled`
split, used by the bootstrap rectification). Duplicates (same normalised
question on the same image) are dropped.

Work is journaled in chunks of `chunk_seeds` seeds (`data.exemplars_tfds`):
each chunk is written atomically, a restart skips the chunks on disk, and the
store is then published as a TFDS array_record dataset in
`<workdir>/mine/tfds`. Failure types (`mine.failure_types`) are ranked for the
audited target and written with the ground-truth measurements to
`<workdir>/mine.json`:

  {"failure_types": [{"name", "count", "share": {TARGET: f}, "rate", ...}],
   "planted_gap_recall", "planted_gaps": {TARGET: {SPEC: {...}}},
   "exemplar_precision", "label_precision", "probes", "exemplars", "wall_s", ...}

With `audit.reward.mode = "judge"` a probe fails a target by the judge's
decision (the judge is asked where the answers differ exactly), and
mine.json adds `judge`: per target, the exact and the judge's failures and
how often they differ.

`mine.unlabelled_types = "on"` (the default) also runs the failure types
without skill labels (`mine.clusters.mine_unlabelled`, settings under
`mine.unlabelled`): the probes embedded with the first auditor's SigLIP
tower and LLM states, the exemplars clustered (HDBSCAN), each top type named
by the auditor and validated by the references. mine.json adds `unlabelled`
({"failure_types": [{"name", "named_by", "size", "members", ...}],
"clusters", "planted_gap_recall", "check": {"ari_skill_answer", ...}}); where
no record carries a skill (real data) its types become `failure_types`
(`failure_types_from: "unlabelled"`, the labelled path's kept as
`failure_types_labelled`). On the scene world `check` measures the clusters
against the skill:answer types and the planted gaps' recall against the
labelled path's.
"""

from __future__ import annotations

import os
import time


from auditdm_jax import models, sharding
from auditdm_jax.audit import diversity as diversity_lib
from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.data import exemplars_tfds as store
from auditdm_jax.eval.benchmark import dumps
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes.mining import KNOWLEDGE
from auditdm_jax.scenes.text import AUDITOR_TASKS
from auditdm_jax.audit.learner import SeedPool
from auditdm_jax.mine import analysis, clusters, journal
from auditdm_jax.mine import probes as probes_lib
from auditdm_jax.pipeline import editing, judging, layout, placement, sections
from auditdm_jax.pipeline.layout import (audit_target, model_dir, published_path, roles, seed_source,
                                         store_paths)
from auditdm_jax.pipeline.recipes import audit_configs
from auditdm_jax.pipeline.spec import Stage, unknown_keys
from auditdm_jax.utils.digest import params_fingerprint

DEFAULTS = dict(auditors=(), seeds=0, samples_per_seed=8, chunk_seeds=32, mixture={},
                temperature=1.0, top_k=5, purity=0.5, merge_rate=0.5, min_probes=3,
                gallery=24, unlabelled_types="on", unlabelled={})
UNLABELLED_MODES = ("on", "off")


def _resolve(config, m: dict) -> dict:
  """The trained auditor(s) and the audit's mixture where the section leaves them."""
  if not m["auditors"]:
    aud = roles(config, "auditor")
    m["auditors"] = tuple(layout.trained_name(a) for a in aud)
  if not m["mixture"]:
    m["mixture"] = dict(config.audit.mixture)
  return m


def _auditor_step(workdir: str, name: str) -> int:
  if layout.is_trained_name(name):
    return int(layout.read_summary(workdir, "audit", {}).get("steps", 0))
  return 0


def run(config, workdir: str) -> dict:
  t0 = time.time()
  if "audit" not in config:
    print("mine: this config has no `audit` section; nothing to mine", flush=True)
    return {}
  m = STAGE.settings(config)
  focus = audit_target(config)
  targets, refs = roles(config, "target"), roles(config, "reference")
  _, _, rcfg = audit_configs(config)
  mixture = rollout_lib.check_mixture(dict(m["mixture"]))
  a = sections.settings(config, "audit")
  dcfg = diversity_lib.DiversityConfig.from_config(a["diversity"])
  k = int(m["samples_per_seed"])
  chunk = int(m["chunk_seeds"])
  if k < 1 or chunk < 1:
    raise ValueError(f"mine.samples_per_seed ({k}) and mine.chunk_seeds ({chunk}) must be >= 1")

  auditor_models = _load(workdir, m["auditors"], targets + refs)
  size = next(iter(auditor_models.values())).config.vision.image_size
  src = seed_source(config, workdir, size)
  n_seeds = int(m["seeds"]) or len(src)
  pool = SeedPool(src, 0, n_seeds)
  n_seeds = len(pool)
  chunks_dir, tfds_dir = store_paths(workdir)

  mesh = placement.mesh(config)
  loaded = _load(workdir, targets + refs)
  bucket = int(a["answer_bucket"])   # one compile per answerer
  answerers = {n: placement.sampler(config, n, loaded[n], mesh, length_bucket=bucket)
               for n in targets + refs}
  editor = editing.build(config, mesh, size)
  seed = int(config.seed)
  judge, judge_params = judging.build(config, workdir, rcfg, answerers,
                                      {**loaded, **auditor_models}, mesh, bucket)
  journal.check_journal_all(chunks_dir, _journal_identity(
      config, m, n_seeds, mixture, rcfg, dcfg, {**loaded, **auditor_models},
      (judge, judge_params)))

  def new_auditing(name, aud):
    return rollout_lib.Auditing(
        placement.sampler(config, name, aud, mesh), answerers, focus, refs, editor, rcfg, num_samples=k,
        temperature=float(m["temperature"]), max_new_tokens=int(config.audit.max_new_tokens),
        answer_tokens=int(a["answer_tokens"]),
        judge=judge, diversity=dcfg, tasks=AUDITOR_TASKS)

  mined = journal.mine_chunks(
      auditor_models, new_auditing, pool, chunks_dir, mixture=mixture, samples_per_seed=k,
      chunk_seeds=chunk, n_seeds=n_seeds, seed=seed, targets=targets, refs=refs, focus=focus,
      consensus=rcfg.consensus, editor=editor,
      auditor_steps={a: _auditor_step(workdir, a) for a in m["auditors"]},
      judge_threshold=rcfg.judge_threshold if judge is not None else None)
  t_pub = time.time()
  path = _publish(workdir, chunks_dir, tfds_dir)
  records = list(store.iter_chunks(chunks_dir))
  gaps = {t: gaps_lib.parse_gaps(list(config.models[t].get("gaps", ()))) for t in targets}
  res = analysis.analyse(records, targets, focus, gaps, m, refs, knowledge=KNOWLEDGE)
  out = {"target": focus, "targets": targets, "references": refs,
         "auditors": list(m["auditors"]), "seeds": n_seeds, "samples_per_seed": k,
         "probes": len(records), "exemplars": sum(bool(r["failed"]) for r in records),
         "exemplars_of": {t: sum(t in r["failed"] for r in records) for t in targets},
         "store": path, "chunks_mined_now": mined, **res,
         "diversity": _diversity(records, m["auditors"], focus),
         "publish_s": time.time() - t_pub, "wall_s": time.time() - t0}
  if judge is not None:
    out["judge"] = {"model": judge.name, "threshold": rcfg.judge_threshold,
                    "targets": probes_lib.judge_summary(records, targets, editor)}
  if m["unlabelled_types"] == "on":
    first = next(iter(auditor_models))
    _without_labels(out, clusters.mine_unlabelled(
        records, targets, focus, gaps, m, new_auditing(first, auditor_models[first]),
        models.build, knowledge=KNOWLEDGE, labelled=res), records)
  if sharding.is_primary():
    layout.write_summary(workdir, "mine", dumps(out))
  _log(out, records, focus)
  return out


def _journal_identity(config, m, n_seeds: int, mixture, rcfg, dcfg, all_models,
                      judged) -> dict:
  """What the mine journal's chunks were mined with (`journal.check_journal_all`
  refuses to mix chunks of another identity)."""
  judge, judge_params = judged
  return {
      "seed": int(config.seed), "seeds": n_seeds, "samples_per_seed": int(m["samples_per_seed"]),
      "chunk_seeds": int(m["chunk_seeds"]),
      "mixture": mixture, "temperature": float(m["temperature"]),
      "max_new_tokens": int(config.audit.max_new_tokens), "consensus": rcfg.consensus,
      "targets": roles(config, "target"), "references": roles(config, "reference"),
      "auditors": list(m["auditors"]),
      "params": {n: params_fingerprint(v.params) for n, v in all_models.items()},
      **_judge_identity(judge, judge_params, rcfg),
      **({"diversity": {"descriptors": list(dcfg.descriptors), "prompt": dcfg.prompt,
                        "generic": dcfg.generic}} if dcfg.on else {})}


def _diversity(records, auditors, focus: str) -> dict:
  """Per auditor, `diversity.diversity_figures` of its mined probes: the top
  question's share, distinct questions, template entropy, and the failure
  categories of `focus` (the records' skill:answer categories, >= 3
  failures each: a measurement)."""
  out = {}
  for a in auditors:
    rs = [r for r in records if r["auditor"] == a]
    out[a] = diversity_lib.diversity_figures(
        [r["question"] for r in rs], [focus in r["failed"] for r in rs],
        [r["category"] for r in rs])
  return out


def _publish(workdir: str, chunks_dir: str, tfds_dir: str) -> str:
  """The store, published by process 0 once every process has mined."""
  sharding.barrier(f"auditdm mine chunks {chunks_dir}")
  path = store.publish(chunks_dir, tfds_dir) if sharding.is_primary() else published_path(workdir)
  sharding.barrier(f"auditdm mine store {tfds_dir}")
  return path


def _load(workdir: str, names, also=()) -> dict:
  """{name: VLM} of `names`, after checking that they and `also` exist."""
  hint = "run the earlier stages first"
  for name in also:
    if not os.path.exists(model_dir(workdir, name)):
      layout.load_model(workdir, name, "mine", hint)     # raises, naming it
  return {n: layout.load_model(workdir, n, "mine", hint) for n in names}


def _judge_identity(judge, params, rcfg) -> dict:
  """The judge's part of the journal manifest ({} in exact mode, which keeps
  the manifest it always had)."""
  if judge is None:
    return {}
  return {"judge": {"model": judge.name, "threshold": rcfg.judge_threshold,
                    "params": params_fingerprint(params)}}


def _without_labels(out: dict, unl: dict, records) -> None:
  """mine.json's `unlabelled`; where no record carries a skill (real data)
  the labelled path's types are just "other: <answer>", and the unlabelled
  types become the failure types."""
  out["unlabelled"] = unl
  if records and not any(r.get("skill") for r in records):
    out["failure_types_labelled"] = out["failure_types"]
    out["failure_types"] = unl["failure_types"]
    out["failure_types_from"] = "unlabelled"
  else:
    out["failure_types_from"] = "labelled"


def _log(out: dict, records, focus: str) -> None:
  if "judge" in out:
    j = out["judge"]["targets"][focus]
    print(f"mine: judge {out['judge']['model']!r}: {j['exemplars_judge']} failures of "
          f"{focus} by the judge, {j['exemplars_exact']} by exact comparison", flush=True)
  n_ex = out["exemplars"]
  top = "; ".join(f"{t['name']} ({t['count']})" for t in out["failure_types"][:5])
  print(f"mine: {len(records)} consensus-backed probes, {n_ex} exemplars "
        f"({out['exemplars_of'][focus]} of {focus}); top failure types of {focus}: {top}; "
        f"planted-gap recall {out['planted_gap_recall']:.2f}, exemplar precision "
        f"{out['exemplar_precision']:.2f}; {out['wall_s']:.0f}s", flush=True)
  for a, d in out.get("diversity", {}).items():
    print(f"mine: {a}'s probes: {diversity_lib.describe(d)} of {focus}", flush=True)
  if out.get("reference_errors"):
    print("mine: the references' joint error on the probes (consensus wrong by the truth): " +
          ", ".join(f"{s} {v['joint']:.3f} (independent {v['independent']:.3f}, n {v['probes']})"
                    for s, v in out["reference_errors"].items()), flush=True)


def problems(config) -> list[str]:
  given = dict(config.get("mine", {}))
  problems = unknown_keys("mine", given, DEFAULTS)
  m = STAGE.settings(config)
  for key in ("samples_per_seed", "chunk_seeds", "top_k", "min_probes"):
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      problems.append(f"mine.{key} must be an int >= 1, got {v!r}")
  if isinstance(m["seeds"], bool) or not isinstance(m["seeds"], int) or m["seeds"] < 0:
    problems.append(f"mine.seeds must be an int >= 0 (0: every seed image), got {m['seeds']!r}")
  for key in ("purity", "merge_rate"):
    v = m[key]
    if not isinstance(v, (int, float)) or not 0 < v <= 1:
      problems.append(f"mine.{key} must be in (0, 1], got {v!r}")
  names = set(config.models) | {layout.trained_name(n) for n, s in config.models.items()
                                if s.get("role", "") == "auditor"}
  bad = [a for a in m["auditors"] if a not in names]
  if bad:
    problems.append(f"mine.auditors: {bad} are not auditor checkpoints of this config "
                    f"(known: {sorted(names)})")
  try:
    rollout_lib.check_mixture(dict(m["mixture"]))
  except (ValueError, TypeError) as e:
    problems.append(f"mine.mixture: {e}")
  if m["unlabelled_types"] not in UNLABELLED_MODES:
    problems.append(f"mine.unlabelled_types must be one of {UNLABELLED_MODES}, got "
                    f"{m['unlabelled_types']!r}")
  if not hasattr(m["unlabelled"], "items"):
    problems.append(f"mine.unlabelled must be a dict of settings, got {m['unlabelled']!r}")
  else:
    problems += clusters.problems(dict(m["unlabelled"]), "mine.unlabelled")
  return problems




STAGE = Stage(
    name="mine", run=run,
    reads="`models/` (trained auditor, targets, refs), seed images, config (`mine`)",
    writes="`mine/chunks/` (journal), `mine/tfds/` (exemplar store, TFDS array_record), "
           "`mine.json` (failure types, recall / precision)",
    section="mine", defaults=DEFAULTS, resolve=_resolve, problems=problems,
    needs=("audit", "models"),
    in_rounds=True)
