"""Per-skill accuracy on the held-out scene benchmark.

A model answers every benchmark question greedily (KV-cache sampler, batches
padded to one shape so one compilation serves the whole benchmark); answers
are normalised VQA-style and compared with the ground truth. Accuracy is
reported per skill, overall (mean over records), and per planted gap (the
benchmark slice a gap spec selects). `healthy` is the accuracy per skill on
records outside every gap slice of the model.

The auditor is evaluated on what it is trained to write: for each route
(question / edit / caption) the fraction of sampled outputs that the world
accepts (a question it can answer, an edit it can apply, a caption it can
render).

Named benchmarks (the real configs): `evaluate_named` scores a model with its
benchmark's metric (`eval/metrics.py`, in the paper's units) through the
predictions journal (`eval/predictions.py`).
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
from auditdm_jax.scenes import captions, edits, parse
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes.questions import SKILLS
from auditdm_jax.scenes.text import AUDITOR_TASKS
from auditdm_jax.scenes.world import Scene
from auditdm_jax.utils.answers import answer_key


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


def accuracy_report(records: Sequence[dict], answers: Sequence[str],
                    gap_specs: Sequence[str] = ()) -> dict:
  """{"accuracy": {SKILL: acc, "overall": acc}, "gap_accuracy": {SPEC: acc},
  "healthy": {SKILL: acc outside every gap slice}, "counts": {...}}."""
  specs = gaps_lib.parse_gaps(list(gap_specs))
  correct = np.array([answer_key(a) == answer_key(r["answer"])
                      for r, a in zip(records, answers, strict=True)])
  skills = np.array([r["skill"] for r in records])
  in_gap = np.zeros(len(records), bool)
  gap_acc, counts = {}, {}
  for spec in specs:
    mask = gaps_lib.gap_mask(records, spec)
    in_gap |= mask
    gap_acc[str(spec)] = float(correct[mask].mean()) if mask.any() else float("nan")
    counts[str(spec)] = int(mask.sum())
  acc, healthy = {}, {}
  for s in SKILLS:
    m = skills == s
    acc[s] = float(correct[m].mean()) if m.any() else float("nan")
    h = m & ~in_gap
    healthy[s] = float(correct[h].mean()) if h.any() else float("nan")
  acc["overall"] = float(correct.mean()) if len(correct) else float("nan")
  return {"accuracy": acc, "gap_accuracy": gap_acc, "healthy": healthy,
          "counts": {"records": len(records), **counts}}


def evaluate_answerer(model: VLM, records: Sequence[dict], gap_specs=(), *,
                      batch_size: int = 256, sampler: Sampler | None = None) -> dict:
  """Per-skill accuracy and gap slices of `model` on scene records; `sampler`
  (default: one on all devices with the default rules) places the model."""
  images = np.stack([r["image"] for r in records])
  answers = answer(model, images, [r["question"] for r in records], batch_size=batch_size,
                   sampler=sampler)
  report = accuracy_report(records, answers, gap_specs)
  report["examples"] = [
      {"question": r["question"], "answer": r["answer"], "model": a, "skill": r["skill"]}
      for r, a in list(zip(records, answers))[:16]]
  return report


def route_validity(route: str, scene: Scene, text: str) -> tuple[bool, str]:
  if route == "question":
    # Strict, as the audit checks questions: only the templates' language.
    q, why = parse.try_answer(scene, text, strict=True)
    return q is not None, why
  if route == "edit":
    s, why = edits.try_edit(scene, text)
    return s is not None, why
  if route == "caption":
    s, why = captions.try_caption(text)
    return s is not None, why
  raise ValueError(f"unknown auditor route {route!r}; routes are {tuple(AUDITOR_TASKS)}")


def evaluate_auditor(model: VLM, records: Sequence[dict], *, batch_size: int = 128,
                     temperature: float = 1.0, seed: int = 0,
                     routes: Sequence[str] | None = None,
                     sampler: Sampler | None = None) -> dict:
  """Fraction of well-formed auditor outputs per route (default: every route;
  `overall` is their mean), sampled at `temperature`; `sampler` places the
  model (default: all devices, default rules)."""
  routes = tuple(AUDITOR_TASKS) if routes is None else tuple(routes)
  bad = [r for r in routes if r not in AUDITOR_TASKS]
  if bad or not routes:
    raise ValueError(f"routes must be a non-empty subset of {tuple(AUDITOR_TASKS)}, "
                     f"got {routes!r}")
  if model.tokenizer is None:
    raise ValueError("the auditor has no tokenizer")
  tok = model.tokenizer
  sampler = sampler or Sampler(model)
  images = np.stack([r["image"] for r in records])
  scenes = [Scene.from_json(r["scene"]) for r in records]
  validity, examples = {}, {}
  params = SamplingParams(max_new_tokens=48, temperature=temperature)
  for i, (route, task) in enumerate(AUDITOR_TASKS.items()):
    if route not in routes:
      continue
    prompts = [tok.prompt(task)] * len(records)
    texts = generate_text(sampler, images, prompts, params, batch_size,
                          rng=jax.random.key(seed + i))
    ok = [route_validity(route, s, t) for s, t in zip(scenes, texts)]
    validity[route] = float(np.mean([v for v, _ in ok]))
    examples[route] = [{"text": t, "valid": v, "reason": why}
                       for t, (v, why) in list(zip(texts, ok))[:6]]
  validity["overall"] = float(np.mean([validity[r] for r in routes]))
  return {"validity": validity, "examples": examples}


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
