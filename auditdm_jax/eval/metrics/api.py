"""The evaluator API: per-record `score`, corpus `aggregate`, and the tables
that describe the metrics (METRICS, UNITS, FIELDS)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

from auditdm_jax.eval.metrics.choice import choice_letter, circular_accuracy, gold_letter
from auditdm_jax.eval.metrics.cider import cider
from auditdm_jax.eval.metrics.common import answers_list, check_prediction
from auditdm_jax.eval.metrics.refcoco import refcoco_accuracy
from auditdm_jax.eval.metrics.text import anls, relaxed_accuracy
from auditdm_jax.eval.metrics.vqa import exact_match, vqa_accuracy
from auditdm_jax.eval.metrics.yesno import mme_scores, pope_scores


RECORD_METRICS = ("vqa", "exact", "anls", "relaxed", "choice", "refcoco")
CORPUS_METRICS = ("cider", "pope", "mme", "circular")

METRICS: dict[str, str] = {
    "vqa": "VQA accuracy, leave-one-out min(#matches/3, 1) after VQA normalisation "
           "(VQAv2, OK-VQA); % of questions",
    "exact": "exact match after VQA normalisation against any answer (GQA); % of questions",
    "anls": "Average Normalised Levenshtein Similarity, threshold 0.5 (DocVQA); ANLS x 100",
    "relaxed": "relaxed accuracy, numbers within 5% relative error, else exact "
               "case-insensitive match (ChartQA); % of questions",
    "choice": "multiple-choice accuracy, the letter the answer picks (`choice_letter`) "
              "against the gold letter (AI2D, SEED-Bench, MMStar, MMT-Bench, MMMU, "
              "RealWorldQA); % of questions",
    "refcoco": "Acc@0.5: PaliGemma <loc> box with IoU >= 0.5 against the gold box "
               "(RefCOCO/+/g); % of expressions",
    "cider": "CIDEr-D, pycocoevalcap semantics (COCO captions); CIDEr x 100",
    "pope": "POPE yes/no hallucination F1, 'yes' positive (also accuracy, precision, "
            "recall, yes ratio); F1 in %",
    "mme": "MME: per category acc + acc+ (0..200), summed; perception (max 2000) + "
           "cognition (max 800) = total; a sum of scores",
    "circular": "MMBench CircularEval: a question counts only if every rotated pass is "
                "right; % of questions",
}
UNITS: dict[str, str] = {
    "vqa": "%", "exact": "%", "anls": "ANLS x 100", "relaxed": "%", "choice": "%",
    "refcoco": "%", "cider": "CIDEr x 100", "pope": "F1 %", "mme": "sum of category scores",
    "circular": "%",
}
# The record fields each metric reads (besides "prediction" in aggregate rows).
FIELDS: dict[str, tuple[str, ...]] = {
    "vqa": ("answers",), "exact": ("answers",), "anls": ("answers",),
    "relaxed": ("answer",), "choice": ("options", "answer"),
    "refcoco": ("box", "image_size"),
    "cider": ("id", "references"), "pope": ("answer",),
    "mme": ("category", "image_id", "answer"), "circular": ("group", "options", "answer"),
}


def _check_metric(metric: str) -> None:
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; metrics are {sorted(METRICS)}")


def _field(record: Mapping, name: str, metric: str):
  if not isinstance(record, Mapping):
    raise ValueError(f"{metric}: a record must be a mapping, got {type(record).__name__}")
  if name not in record:
    raise ValueError(f"{metric}: the record has no {name!r} field (has {sorted(record)})")
  return record[name]


def _record_answers(record: Mapping, metric: str) -> list[str]:
  """"answers" (a list), or a single "answer" (a str)."""
  if isinstance(record, Mapping) and "answers" in record:
    return answers_list(record["answers"], f"{metric}: 'answers'")
  if isinstance(record, Mapping) and "answer" in record:
    return answers_list(record["answer"], f"{metric}: 'answer'")
  return answers_list(_field(record, "answers", metric))


def score(metric: str, prediction: str, record: Mapping) -> float:
  """One record's score in [0, 1] under a per-record metric.

  Fields read from `record` (`FIELDS`):
    vqa, exact, anls   "answers": list of str (or "answer": one str)
    relaxed            "answer": the target str (or "answers": best of several)
    choice             "options": list of option texts; "answer": the gold
                       letter ("B"), 0-based index, or option text
    refcoco            "box": [x, y, w, h] COCO pixels; "image_size": (w, h)
  Corpus metrics ("cider", "pope", "mme", "circular") have no per-record
  score: use `aggregate`."""
  _check_metric(metric)
  if metric in CORPUS_METRICS:
    raise ValueError(f"{metric!r} is a corpus metric with no per-record score; "
                     f"use aggregate({metric!r}, rows)")
  prediction = check_prediction(prediction)
  if metric == "vqa":
    return vqa_accuracy(prediction, _record_answers(record, metric))
  if metric == "exact":
    return exact_match(prediction, _record_answers(record, metric))
  if metric == "anls":
    return anls(prediction, _record_answers(record, metric))
  if metric == "relaxed":
    return max(relaxed_accuracy(prediction, t) for t in _record_answers(record, metric))
  if metric == "choice":
    options = _field(record, "options", metric)
    gold = gold_letter(_field(record, "answer", metric), options)
    return float(choice_letter(prediction, options) == gold)
  # refcoco
  return refcoco_accuracy(prediction, _field(record, "box", metric),
                          _field(record, "image_size", metric))


def _rows(rows, metric: str) -> list[Mapping]:
  rows = list(rows)
  if not rows:
    raise ValueError(f"{metric}: no rows to aggregate")
  for i, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise ValueError(f"{metric}: row {i} must be a mapping, got {type(row).__name__}")
    if "prediction" not in row:
      raise ValueError(f"{metric}: row {i} has no 'prediction' field")
  return rows


def aggregate(metric: str, rows: Iterable[Mapping]) -> dict:
  """A benchmark's corpus score, headline in the paper's unit.

  `rows`: one mapping per record: the benchmark fields (`FIELDS[metric]`)
  plus "prediction", the model's decoded text. Returns {"score": headline,
  "unit": UNITS[metric], "count": rows, ...}; extra keys by metric:
    per-record metrics  the mean of `score` x 100 (ANLS x 100 for "anls")
    cider       rows {"id", "prediction", "references"}; score = CIDEr x 100,
                "cider" the raw value; ids must be unique
    pope        rows {"prediction", "answer": "yes"/"no"}; score = F1 in %;
                accuracy, precision, recall, yes_ratio also in %, and the
                counts tp, fp, tn, fn
    mme         rows {"category", "image_id", "prediction", "answer"};
                score = total (perception + cognition + other); the
                `mme_scores` breakdown
    circular    rows {"group", "options", "answer", "prediction"}, one per
                circular pass, "group" naming the original question;
                score = % of groups with every pass right; "groups" = count
  """
  _check_metric(metric)
  rows = _rows(rows, metric)
  out = {"metric": metric, "unit": UNITS[metric], "count": len(rows)}
  if metric in RECORD_METRICS:
    values = [score(metric, r["prediction"], r) for r in rows]
    out["score"] = 100.0 * float(np.mean(values))
    return out
  if metric == "cider":
    preds, refs = {}, {}
    for r in rows:
      key = _field(r, "id", metric)
      if key in preds:
        raise ValueError(f"cider: image id {key!r} appears in more than one row")
      preds[key] = r["prediction"]
      refs[key] = _field(r, "references", metric)
    raw = cider(preds, refs)
    out.update(score=100.0 * raw, cider=raw)
    return out
  if metric == "pope":
    s = pope_scores([r["prediction"] for r in rows], [_field(r, "answer", metric) for r in rows])
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
      out[k] = 100.0 * s[k]
    out.update({k: s[k] for k in ("tp", "fp", "tn", "fn")}, score=out["f1"])
    return out
  if metric == "mme":
    s = mme_scores(rows)
    out.update(s, score=s["total"])
    return out
  # circular
  groups: dict = defaultdict(list)
  for r in rows:
    options = _field(r, "options", metric)
    gold = gold_letter(_field(r, "answer", metric), options)
    groups[_field(r, "group", metric)].append((choice_letter(r["prediction"], options), gold))
  out.update(score=100.0 * circular_accuracy(groups), groups=len(groups))
  return out
