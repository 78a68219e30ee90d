"""Per-skill accuracy on the held-out scene benchmark, and the auditor's validity.

A model answers every benchmark question greedily (`eval.benchmark.answer`);
answers are normalised VQA-style and compared with the ground truth. Accuracy
is reported per skill, overall (mean over records), and per planted gap (the
benchmark slice a gap spec selects). `healthy` is the accuracy per skill on
records outside every gap slice of the model.

The auditor is evaluated on what it is trained to write: for each route
(question / edit / caption) the fraction of sampled outputs that the world
accepts (a question it can answer, an edit it can apply, a caption it can
render).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from auditdm_jax.eval.benchmark import answer, generate_text
from auditdm_jax.models.handle import VLM
from auditdm_jax.sampling import Sampler, SamplingParams
from auditdm_jax.scenes import captions, edits, parse
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes.questions import SKILLS
from auditdm_jax.scenes.text import AUDITOR_TASKS
from auditdm_jax.scenes.world import Scene
from auditdm_jax.utils.answers import answer_key


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
