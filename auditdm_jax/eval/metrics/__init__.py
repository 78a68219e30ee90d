"""Scoring real benchmarks the way the field scores them.

Pure Python / numpy, no model code: every function takes decoded text (and the
benchmark's ground truth) and returns a number. Each function's docstring
names the evaluation it follows; the rules (word lists, thresholds, edge
cases) are those of that evaluation, re-implemented here. Where this module
departs from the reference on purpose, the docstring says so.

Two levels:

  per-record   score(metric, prediction, record) -> float in [0, 1]
               metrics: "vqa", "exact", "anls", "relaxed", "choice", "refcoco"
  corpus       aggregate(metric, rows) -> dict
               every metric above (the mean of `score`) and the metrics that
               only exist over a corpus: "cider", "pope", "mme", "circular".

`aggregate` always returns {"score": headline, "unit": ..., "count": ...,
...details}, the headline in the unit the papers print (VQA accuracy in %,
ANLS x 100, CIDEr x 100, POPE F1 in %, MME as a sum of category scores).
`METRICS` describes each metric and `UNITS` names its headline unit. A row of
`aggregate` is the benchmark record with the model's text under "prediction";
the fields each metric reads are listed in `FIELDS`.

Malformed input (an unknown metric, an empty answer list, a missing field, a
label that is not "yes"/"no", ...) raises ValueError naming the problem.

One module per metric family: vqa.py (VQA accuracy, exact match), text.py
(ANLS, ChartQA relaxed accuracy), choice.py (multiple-choice letters,
CircularEval), yesno.py (POPE, MME), refcoco.py (PaliGemma boxes), cider.py
(CIDEr-D), common.py (what they share), api.py (`score`, `aggregate` and the
tables). This package re-exports every public name.
"""

from auditdm_jax.eval.metrics.api import (CORPUS_METRICS, FIELDS, METRICS, RECORD_METRICS,
                                          UNITS, aggregate, score)
from auditdm_jax.eval.metrics.choice import choice_letter, circular_accuracy, gold_letter
from auditdm_jax.eval.metrics.cider import (PTB_PUNCTUATION, caption_tokens, cider,
                                            cider_per_image)
from auditdm_jax.eval.metrics.common import answer_key
from auditdm_jax.eval.metrics.refcoco import LOC_BINS, box_iou, decode_loc_box, refcoco_accuracy
from auditdm_jax.eval.metrics.text import anls, levenshtein, relaxed_accuracy
from auditdm_jax.eval.metrics.vqa import exact_match, vqa_accuracy
from auditdm_jax.eval.metrics.yesno import (MME_COGNITION, MME_PERCEPTION, mme_answer, mme_scores,
                                            pope_answer, pope_scores)

__all__ = [
    "CORPUS_METRICS", "FIELDS", "LOC_BINS", "METRICS", "MME_COGNITION", "MME_PERCEPTION",
    "PTB_PUNCTUATION", "RECORD_METRICS", "UNITS", "aggregate", "anls", "answer_key", "box_iou",
    "caption_tokens", "choice_letter", "cider", "cider_per_image", "circular_accuracy",
    "decode_loc_box", "exact_match", "gold_letter", "levenshtein", "mme_answer", "mme_scores",
    "pope_answer", "pope_scores", "refcoco_accuracy", "relaxed_accuracy", "score",
    "vqa_accuracy",
]
