"""Free-text answers: ANLS (DocVQA) and relaxed accuracy (ChartQA)."""

from __future__ import annotations

import math

from auditdm_jax.eval.metrics.common import answers_list, check_prediction


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions, each cost 1)."""
  if len(a) < len(b):
    a, b = b, a
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
  """Average Normalised Levenshtein Similarity of one question (DocVQA; the
  official RRC evaluation script, also lmms-eval's `anls`): both strings
  stripped, lowercased and whitespace-collapsed; NL = edit distance / the
  longer length; the question scores 1 - NL for the closest answer when that
  NL < threshold, else 0 (the published definition, Biten et al. 2019: an NL
  of exactly 0.5 scores 0 at the default threshold).

  As in the official script the lengths are those of the strings before
  normalisation (so trailing whitespace lengthens the denominator); two empty
  strings score 1.0."""
  prediction = check_prediction(prediction)
  answers = answers_list(answers)
  pred = " ".join(prediction.strip().lower().split())
  dists = []
  for answer in answers:
    gt = " ".join(answer.strip().lower().split())
    length = max(len(answer), len(prediction))
    dists.append(0.0 if length == 0 else levenshtein(gt, pred) / length)
  nl = min(dists)
  return float(1.0 - nl) if nl < threshold else 0.0


def _to_number(text: str) -> float | None:
  """ChartQA's number reading: float(text), "x%" read as x / 100; anything
  else (and, unlike the reference, nan/inf) is not a number."""
  try:
    value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
  """ChartQA relaxed accuracy (Masry et al. 2022 after Methani et al. 2020;
  big_vision's `chartqa` evaluator, lmms-eval's `relaxed_correctness`):
  when both strings read as numbers and the target is not 0, correct iff
  |prediction - target| / |target| <= tolerance; otherwise (text answers, or
  a target of 0, which needs the exact string "0") correct iff the two
  strings are equal ignoring case. A trailing "%" divides by 100 on either
  side, so "5%" matches "0.05" (and not "5"). Both strings are stripped of
  surrounding whitespace first; "1,000" is not a number (as in the
  reference) and is compared as text."""
  prediction = check_prediction(prediction).strip()
  if not isinstance(target, str):
    raise ValueError(f"the ChartQA target must be a str, got {type(target).__name__}")
  target = target.strip()
  pred_num, target_num = _to_number(prediction), _to_number(target)
  if pred_num is not None and target_num:
    return float(abs(pred_num - target_num) / abs(target_num) <= tolerance)
  return float(prediction.lower() == target.lower())
