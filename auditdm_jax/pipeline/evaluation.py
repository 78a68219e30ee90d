"""Answerer evaluation the eval and rectify stages share: the scene benchmark's
per-answerer report remembered in `<workdir>/eval_cache/` (keyed by the
weights, so rectify's "before" is eval's number without a second pass), and
the named benchmarks of the real configs, each scored with its own metric
through the per-sample predictions journal (`eval/predictions.py`)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from auditdm_jax import sharding
from auditdm_jax.data import named
from auditdm_jax.eval import benchmark, metrics, predictions
from auditdm_jax.pipeline import layout, placement, sections
from auditdm_jax.scenes import benchmark as scene_benchmark
from auditdm_jax.train import preemption
from auditdm_jax.utils.digest import params_fingerprint
from auditdm_jax.utils.fileio import atomic_write_text


def records(src, n: int | None = None) -> list[dict]:
  n = len(src) if n is None else min(n, len(src))
  return [src[i] for i in range(n)]


def cached_report(workdir: str, model, records: list[dict], gaps: list[str], *,
                  config=None, name: str = "") -> dict:
  """scenes.benchmark.evaluate_answerer, remembered in `<workdir>/eval_cache/`: keyed by
  a digest of the weights (`utils.digest.params_fingerprint`), the benchmark's
  questions and the gap specs, so the rectify stage's measurements are not
  repeated by `eval`, and rerunning `all` repeats no evaluation. With `config`
  and the model's `name`, a measurement runs on the run's mesh with that
  model's partition rules (`placement`)."""
  h = hashlib.sha1(params_fingerprint(model.params).encode())
  for r in records:
    h.update(f"{r['question']}|{r['answer']}|{r.get('scene', '')}\n".encode())
  h.update("|".join(gaps).encode())
  path = os.path.join(workdir, "eval_cache", h.hexdigest()[:20] + ".json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError) as e:   # a corrupt entry: measure again, rewrite it
      print(f"eval: cache entry {path} is unreadable ({e}); measuring again", flush=True)
  sampler = placement.sampler(config, name, model) if config is not None else None
  rep = scene_benchmark.evaluate_answerer(model, records, gaps, sampler=sampler)
  # Plain JSON with NaN kept as NaN (an empty gap slice), so a cached report
  # reads back exactly as a fresh one.
  text = json.dumps(rep, default=lambda o: o.item() if hasattr(o, "item") else str(o))
  if sharding.is_primary():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, text)
  return json.loads(text)


PREDICTIONS = os.path.join("eval_cache", "predictions")   # the journal, under the workdir


def benchmark_specs(config) -> dict[str, dict]:
  """{name: dataset spec} of the config's named benchmarks (`data.benchmarks`)."""
  d = config.get("data", {})
  return {name: dict(spec) for name, spec in sorted(dict(d.get("benchmarks", {}) or {}).items())}


def benchmark_units(config) -> dict[str, dict]:
  """{name: {"metric", "unit"}} of the named benchmarks (metrics.UNITS)."""
  out = {}
  for name, spec in benchmark_specs(config).items():
    metric = named.metric_of(spec) or "exact"
    out[name] = {"metric": metric, "unit": metrics.UNITS[metric]}
  return out


def benchmark_records(config) -> dict[str, list[dict]]:
  """{name: records without their images} of the config's named benchmarks,
  each cut to `eval.max_examples` (0: all). Opening a benchmark refuses a
  record that lacks a field of its metric (data/named.py)."""
  limit = int(sections.settings(config, "eval")["max_examples"] or 0)
  out = {}
  for name, spec in benchmark_specs(config).items():
    src = named.open_source(spec)
    n = min(len(src), limit) if limit else len(src)
    out[name] = [src.meta(i) for i in range(n)]
  return out


def _images(spec: dict, size: int, cache: dict):
  """images(records) of a benchmark at a model's resolution (the source opened once)."""
  def load(part):
    key = (json.dumps(spec, sort_keys=True), size)
    if key not in cache:
      cache[key] = named.open_source(spec, size)
    src = cache[key]
    return np.stack([src[int(r["index"])]["image"] for r in part])
  return load


def evaluate_workdir_named(config, workdir: str, answerers: list[str], swap=None,
                   benches=None) -> dict:
  """{model: {"benchmarks": {benchmark: {"metric", "unit", "score", ...details,
  "records"}}, "accuracy": {benchmark: score / 100}, "examples": ...}} of the
  answering models on the named benchmarks, each scored with its metric
  (`eval.benchmark.score_named`; "score" in the paper's unit, "accuracy" the
  same number / 100 for the report's before / after table); `swap` maps a
  name to another checkpoint directory (rectify's "after"); `benches`:
  benchmark_records(config), when the caller already read them.

  Predictions go through the journal in `<workdir>/eval_cache/predictions/`
  (eval/predictions.py), keyed by the weights' fingerprint: a restart after a
  crash or SIGTERM (exit 143 after the chunk in progress) predicts only what is
  missing, and the same weights evaluated again (rectify's "before", then
  eval) generate nothing."""
  benches = benchmark_records(config) if benches is None else benches
  specs = benchmark_specs(config)
  # the answerers' greedy answer length, as the audit reads their answers
  default_new = int(sections.settings(config, "audit")["answer_tokens"])
  batch = int(sections.settings(config, "eval")["batch"])
  root = os.path.join(workdir, PREDICTIONS)
  out, cache = {}, {}
  with preemption.StopOnSignal() as stop:   # SIGTERM: stop after the chunk in progress
    for name in answerers:
      model = layout.load_model(workdir, name, "eval", "run the init stage first",
                                path=(swap or {}).get(name))
      fp = params_fingerprint(model.params)
      size = model.config.vision.image_size
      made = []

      def make_sampler(name=name, model=model, made=made):
        """The model's sampler, made once, and only if something is left to predict."""
        if not made:
          made.append(placement.sampler(config, name, model))
        return made[0]

      reps, acc, examples = {}, {}, {}
      for b, recs in benches.items():
        spec = specs[b]
        metric = named.metric_of(spec) or "exact"
        max_new = int(spec.get("max_new_tokens", 0) or 0) or default_new
        journal = predictions.Journal(root, fp, b, {"max_new_tokens": max_new, "greedy": True,
                                                    "family": model.config.family})

        def after_chunk(done, total, journal=journal, b=b):
          if stop.requested():
            raise stop.stop(f"after {done} of {total} predictions of {name} on {b}; the "
                            f"predictions so far are in {journal.dir}")

        rep = benchmark.evaluate_named(
            model, recs, metric=metric, images=_images(spec, size, cache),
            max_new_tokens=max_new, batch_size=batch, journal=journal,
            write=sharding.is_primary(), after_chunk=after_chunk,
            sampler=make_sampler)
        print(f"eval: {name} on {b}: {rep['predicted']} of {rep['records']} records "
              f"predicted now, the rest from {journal.dir}", flush=True)
        examples[b] = rep.pop("examples")[:4]
        rep.pop("predicted")
        reps[b] = rep
        acc[b] = rep["score"] / 100.0
      out[name] = {"benchmarks": reps, "accuracy": acc, "examples": examples}
      # the journal is written by process 0; the others read it on their next pass
      sharding.barrier(f"auditdm eval predictions {name}")
  return out
