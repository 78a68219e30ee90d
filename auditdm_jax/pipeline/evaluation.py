"""Answerer evaluation the eval and rectify stages share: the scene benchmark's
per-answerer report remembered in `<workdir>/eval_cache/` (keyed by the
weights, so rectify's "before" is eval's number without a second pass), and
the named benchmarks of the real configs."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from auditdm_jax import models, sharding
from auditdm_jax.data import named
from auditdm_jax.eval import benchmark
from auditdm_jax.pipeline import layout, placement
from auditdm_jax.utils.digest import params_fingerprint
from auditdm_jax.utils.fileio import atomic_write_text


def records(src, n: int | None = None) -> list[dict]:
  n = len(src) if n is None else min(n, len(src))
  return [src[i] for i in range(n)]


def cached_report(workdir: str, model, records: list[dict], gaps: list[str], *,
                  config=None, name: str = "") -> dict:
  """benchmark.evaluate_answerer, remembered in `<workdir>/eval_cache/`: keyed by
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
  rep = benchmark.evaluate_answerer(model, records, gaps, sampler=sampler)
  # Plain JSON with NaN kept as NaN (an empty gap slice), so a cached report
  # reads back exactly as a fresh one.
  text = json.dumps(rep, default=lambda o: o.item() if hasattr(o, "item") else str(o))
  if sharding.is_primary():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, text)
  return json.loads(text)


def benchmark_records(config) -> dict[str, list[dict]]:
  """{name: records} of the config's named benchmarks (`data.benchmarks`),
  each cut to `eval.max_examples` (0: all)."""
  d = config.get("data", {})
  limit = int(config.get("eval", {}).get("max_examples", 0) or 0)
  out = {}
  for name, spec in sorted(dict(d.get("benchmarks", {}) or {}).items()):
    src = named.open_source(dict(spec))
    n = min(len(src), limit) if limit else len(src)
    out[name] = [src[i] for i in range(n)]
  return out


def evaluate_named(config, workdir: str, answerers: list[str], swap=None,
                   benches=None) -> dict:
  """{model: {"accuracy": {benchmark: acc, "mean": acc}, "examples": ...}} of
  the answering models on the named benchmarks; `swap` maps a name to another
  checkpoint directory (rectify's "after"); `benches`: benchmark_records(config),
  when the caller already read them."""
  benches = benchmark_records(config) if benches is None else benches
  # the answerers' greedy answer length, as the audit reads their answers
  max_new = int(config.get("audit", {}).get("answer_tokens", 16))
  batch = int(config.get("eval", {}).get("batch", 64))
  out = {}
  for name in answerers:
    path = (swap or {}).get(name, layout.model_dir(workdir, name))
    if not os.path.exists(path):
      raise FileNotFoundError(f"eval: model {name!r} has no checkpoint at {path}; run the "
                              "init stage first")
    model = models.load(path)
    sampler = placement.sampler(config, name, model)
    acc, examples = {}, {}
    for b, recs in benches.items():
      rep = benchmark.evaluate_named(model, recs, max_new_tokens=max_new, batch_size=batch,
                                     sampler=sampler)
      acc[b], examples[b] = rep["accuracy"], rep["examples"][:4]
    acc["mean"] = float(np.mean(list(acc.values()))) if acc else float("nan")
    out[name] = {"accuracy": acc, "examples": examples}
  return out
