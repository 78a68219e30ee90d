"""What every metric shares: the comparison key of an answer, and the checks
of a prediction and of a ground-truth answer list."""

from __future__ import annotations

import string

from auditdm_jax.utils import answers


def answer_key(text: str) -> str:
  """The comparison key of an answer: its VQA normalisation; when that is
  empty (the answer was only an article or punctuation, e.g. the letter "A"),
  the lowercased text without surrounding punctuation, marked so it can never
  equal a non-empty normalisation. Without this an empty prediction would
  "match" the gold letter "A" (both normalise to "")."""
  norm = answers.vqa_official(text)
  if norm:
    return norm
  return "\x00" + text.strip().lower().strip(string.punctuation + string.whitespace)


def answers_list(answers, what: str = "answers") -> list[str]:
  if isinstance(answers, str):
    answers = [answers]
  answers = list(answers) if answers is not None else []
  if not answers:
    raise ValueError(f"{what}: the list of ground-truth answers is empty")
  for a in answers:
    if not isinstance(a, str):
      raise ValueError(f"{what}: every answer must be a str, got {type(a).__name__}")
  return answers


def check_prediction(prediction) -> str:
  if not isinstance(prediction, str):
    raise ValueError(f"the prediction must be a str, got {type(prediction).__name__}")
  return prediction
