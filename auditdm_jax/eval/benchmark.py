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
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import numpy as np

from auditdm_jax.models.handle import VLM
from auditdm_jax.models.inputs import default_stop_ids, fit_images
from auditdm_jax.sampling import Sampler, SamplingParams
from auditdm_jax.scenes import captions, edits, parse
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes.questions import SKILLS, normalise_answer
from auditdm_jax.scenes.text import AUDITOR_TASKS
from auditdm_jax.scenes.world import Scene


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
  correct = np.array([normalise_answer(a) == normalise_answer(r["answer"])
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


def evaluate_named(model: VLM, records: Sequence[dict], *, max_new_tokens: int = 16,
                   batch_size: int = 64, sampler: Sampler | None = None) -> dict:
  """Exact-match accuracy (answers normalised VQA-style) of greedy answers on a
  named benchmark's records ({"image", "question", "answer"}): {"accuracy",
  "records", "examples"}. Images are fitted to the model's resolution."""
  if model.tokenizer is None:
    raise ValueError("the model has no tokenizer (load its checkpoint with tokenizer.model)")
  if not len(records):
    raise ValueError("the benchmark has no records")
  sampler = sampler or Sampler(model)
  images = fit_images(np.stack([r["image"] for r in records]), model.config.vision.image_size)
  prompts = [model.tokenizer.prompt(r["question"]) for r in records]
  answers = generate_text(sampler, images, prompts,
                          SamplingParams(max_new_tokens=max_new_tokens),
                          min(batch_size, len(records)))
  correct = [normalise_answer(a) == normalise_answer(r["answer"])
             for r, a in zip(records, answers, strict=True)]
  return {"accuracy": float(np.mean(correct)), "records": len(records),
          "examples": [{"question": r["question"], "answer": r["answer"], "model": a}
                       for r, a in list(zip(records, answers))[:16]]}


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
