"""Answering benchmarks: greedy answers and named benchmarks' scores.

A model answers every benchmark question greedily (`answer`, `generate_text`:
KV-cache sampler, batches padded to one shape so one compilation serves the
whole benchmark). Named benchmarks (the real configs): `evaluate_named`
scores a model with its benchmark's metric (`eval/metrics/`, in the
paper's units) through the predictions journal (`eval/predictions.py`).
The scene world's benchmark (per-skill accuracy, gap slices, the auditor's
validity) is `scenes/benchmark.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import jax
import numpy as np

from auditdm_jax.eval import metrics, predictions
from auditdm_jax.models.handle import VLM
from auditdm_jax.models.inputs import default_stop_ids, fit_images
from auditdm_jax.sampling import Sampler, SamplingParams


def generate_text(sampler: Sampler, images: np.ndarray, prompts: Sequence[list[int]],
                  params: SamplingParams, batch_size: int, rng=None) -> list[str]:
  """Decoded continuations, in order; the last partial batch is padded by
  repeating its first row so every call has the same shape."""
  tok = sampler.tokenizer
  stops = set(default_stop_ids(sampler.cfg, tok))
  out = []
  rng = jax.random.key(0) if rng is None else rng
  for start in range(0, len(prompts), batch_size):
    stop = min(start + batch_size, len(prompts))
    idx = list(range(start, stop)) + [start] * (batch_size - (stop - start))
    rng, key = jax.random.split(rng)
    res = sampler.sample(images[idx], [prompts[i] for i in idx], params, rng=key)
    rows = res.rows()[:(stop - start) * params.num_samples]
    out += [tok.decode(strip_stops(r, stops)) for r in rows]
  return out


def strip_stops(tokens, stop_ids) -> list[int]:
  """Tokens up to (not including) the first stop id (EOS, <end_of_turn>)."""
  out = []
  for t in tokens:
    if int(t) in stop_ids:
      break
    out.append(int(t))
  return out


def answer(model: VLM, images: np.ndarray, questions: Sequence[str], *,
           batch_size: int = 256, sampler: Sampler | None = None) -> list[str]:
  if model.tokenizer is None:
    raise ValueError("the model has no tokenizer; scene benchmarks need the world tokenizer")
  sampler = sampler or Sampler(model)
  prompts = [model.tokenizer.prompt(q) for q in questions]
  return generate_text(sampler, images, prompts, SamplingParams(max_new_tokens=4),
                       batch_size)


def metric_row(metric: str, record: dict, prediction: str) -> dict:
  """A benchmark record (data/named.py) with the model's text as the row
  `metrics.aggregate` reads (`metrics.FIELDS`): CIDEr's rows are keyed by the
  image and carry the captions as "references"."""
  row = {k: v for k, v in record.items() if k != "image"}
  row["prediction"] = prediction
  if metric == "cider":
    row["id"] = record.get("image_id", record.get("id"))
    row["references"] = list(record.get("answers") or [record.get("answer", "")])
  return row


def score_named(metric: str, records: Sequence[dict], predictions: Sequence[str]) -> dict:
  """The benchmark's score from its records and the model's texts:
  `metrics.aggregate` ({"metric", "unit", "score" (the headline in the
  paper's unit), "count", ...details}), with, when the records carry two or
  more categories (POPE's splits, a benchmark's categories; not MME, which
  reports its own, nor the corpus-level CIDEr / circular scores),
  "by_category": {category: headline}."""
  rows = [metric_row(metric, r, p) for r, p in zip(records, predictions, strict=True)]
  out = metrics.aggregate(metric, rows)
  cats = sorted({str(r["category"]) for r in records if "category" in r})
  if len(cats) > 1 and metric not in ("mme", "cider", "circular"):
    out["by_category"] = {
        c: metrics.aggregate(metric, [w for w in rows if str(w.get("category")) == c])["score"]
        for c in cats}
  return out


def evaluate_named(model: VLM, records: Sequence[dict], *, metric: str = "exact",
                   images=None, max_new_tokens: int = 16, batch_size: int = 64,
                   sampler: Sampler | Callable[[], Sampler] | None = None, journal=None,
                   write: bool = True, after_chunk=None) -> dict:
  """A named benchmark's score (`score_named`: the metric's headline in the
  paper's unit, its details) from greedy answers to the records' prompts
  (data/named.py records: "prompt", else "question"; "id", else the position),
  plus "records", "predicted" (how many were generated now) and "examples".

  Generation goes through the predictions journal (`eval/predictions.py`,
  when `journal` is given: what it holds for these weights and prompts is
  reused; the rest is predicted batch_size records at a time, each batch
  journaled before the next (by this process when `write`), then
  after_chunk(done, total)). Records may come without their images:
  images(records) -> uint8 [n, H, W, 3] loads those of a batch. Images are
  fitted to the model's resolution. `sampler` may be a function that makes
  one (called only if something is left to predict; default: all devices)."""
  if model.tokenizer is None:
    raise ValueError("the model has no tokenizer (load its checkpoint with tokenizer.model)")
  if not len(records):
    raise ValueError("the benchmark has no records")
  records = [dict(r, id=str(r.get("id", i)), prompt=r.get("prompt", r["question"]))
             for i, r in enumerate(records)]
  made = []

  def get_sampler() -> Sampler:
    if not made:
      made.append(sampler() if callable(sampler) and not isinstance(sampler, Sampler)
                  else sampler or Sampler(model))
    return made[0]

  size = model.config.vision.image_size
  batch = min(batch_size, len(records))   # one shape for every batch (the last is padded)
  params = SamplingParams(max_new_tokens=max_new_tokens)

  def generate(part):
    if all("image" in r for r in part):
      ims = np.stack([r["image"] for r in part])
    elif images is None:
      raise ValueError("the records carry no images and no images() loader was given")
    else:
      ims = np.asarray(images(part))
    prompts = [model.tokenizer.prompt(r["prompt"]) for r in part]
    return generate_text(get_sampler(), fit_images(ims, size), prompts, params, batch)

  answers, predicted = predictions.predict(journal, records, generate, batch, write=write,
                                           after_chunk=after_chunk)
  out = score_named(metric, records, answers)
  out.update(records=len(records), predicted=predicted,
             examples=[{"question": r["question"], "answer": r["answer"], "model": a}
                       for r, a in list(zip(records, answers))[:16]])
  return out


def dumps(obj) -> str:
  """JSON with NaN written as null (strict JSON readers reject NaN)."""
  def fix(x):
    if isinstance(x, float) and not np.isfinite(x):
      return None
    if isinstance(x, dict):
      return {k: fix(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [fix(v) for v in x]
    return x
  return json.dumps(fix(obj), indent=2)
