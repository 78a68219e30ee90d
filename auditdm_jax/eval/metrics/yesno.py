"""Yes/no benchmarks: POPE and MME."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from auditdm_jax.eval.metrics.common import check_prediction


def _yes_no_label(label, what: str) -> str:
  if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
    raise ValueError(f"{what} must be 'yes' or 'no', got {label!r}")
  return label.strip().lower()


def pope_answer(prediction: str) -> str:
  """POPE's reading of a free-form answer (the official POPE `evaluate.py`,
  also LLaVA's `eval_pope.py`): keep the text before the first ".", drop
  commas, split into words; "no" if any word is exactly "No", "no" or "not",
  else "yes". So an empty or evasive answer counts as yes, and so does "NO"
  (the word test is case-sensitive). One deviation: words are split at any
  whitespace, not only at spaces, so "No\\n" reads as no."""
  prediction = check_prediction(prediction)
  words = prediction.split(".")[0].replace(",", "").split()
  return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict:
  """POPE (Li et al. 2023; official `evaluate.py`) with "yes" the positive
  class: predictions read by `pope_answer`, labels "yes"/"no".

  Returns fractions in [0, 1]: accuracy, precision, recall, f1, and
  yes_ratio (the fraction of *predictions* that are yes, as the official
  script reports it), with the counts tp, fp, tn, fn and count. Where the
  official script would divide by zero (no predicted or no actual
  positives) the value is 0.0."""
  predictions, labels = list(predictions), list(labels)
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
  if not predictions:
    raise ValueError("no predictions to score")
  tp = fp = tn = fn = 0
  for i, (pred, label) in enumerate(zip(predictions, labels)):
    yes_pred = pope_answer(pred) == "yes"
    yes_label = _yes_no_label(label, f"label {i}") == "yes"
    tp += yes_pred and yes_label
    fp += yes_pred and not yes_label
    tn += not yes_pred and not yes_label
    fn += not yes_pred and yes_label
  n = len(predictions)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
          "yes_ratio": (tp + fp) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "count": n}


# MME's official category lists (Fu et al. 2023, the eval_tool's calculation.py).
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity",
                  "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")
_MME_GROUP = {c.lower(): "perception" for c in MME_PERCEPTION}
_MME_GROUP.update({c.lower(): "cognition" for c in MME_COGNITION})


def mme_answer(prediction: str) -> str:
  """MME's reading of an answer (official calculation.py `parse_pred_ans`):
  lowercased (and here also stripped), "yes"/"no" as is, else "yes" if "yes"
  occurs in the first four characters, else "no" if "no" does, else
  "other" (always wrong)."""
  pred = check_prediction(prediction).strip().lower()
  if pred in ("yes", "no"):
    return pred
  head = pred[:4]
  return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(records: Iterable[Mapping], require_pairs: bool = True) -> dict:
  """MME scores (Fu et al. 2023, the official eval_tool; lmms-eval `mme`).

  Each record: {"category", "image_id", "prediction", "answer" ("yes"/"no")};
  MME asks two questions per image. Per category, acc = % of questions right,
  acc_plus = % of images with both questions right, score = acc + acc_plus
  (0..200). "perception" sums the scores of the official perception
  categories present (10 categories, max 2000), "cognition" those of the
  cognition categories (4, max 800); names are matched case-insensitively,
  and categories on neither list are summed into "other"; "total" =
  perception + cognition + other.

  With require_pairs (the default, as MME is defined) an image with other
  than two questions is an error; without it acc_plus counts an image when
  all of its questions are right.

  Returns {"categories": {name: {"acc", "acc_plus", "score", "questions",
  "images"}}, "perception", "cognition", "other", "total"}."""
  per_image: dict[str, dict] = defaultdict(lambda: defaultdict(list))
  for i, rec in enumerate(records):
    for field in ("category", "image_id", "prediction", "answer"):
      if field not in rec:
        raise ValueError(f"MME record {i} has no {field!r}")
    gold = _yes_no_label(rec["answer"], f"MME record {i} answer")
    per_image[rec["category"]][rec["image_id"]].append(mme_answer(rec["prediction"]) == gold)
  if not per_image:
    raise ValueError("no MME records to score")
  categories = {}
  sums = {"perception": 0.0, "cognition": 0.0, "other": 0.0}
  for cat, images in per_image.items():
    if require_pairs:
      for image_id, hits in images.items():
        if len(hits) != 2:
          raise ValueError(f"MME category {cat!r} image {image_id!r} has {len(hits)} "
                           "questions; MME pairs two per image (require_pairs=False to allow)")
    questions = sum(len(h) for h in images.values())
    acc = 100.0 * sum(sum(h) for h in images.values()) / questions
    acc_plus = 100.0 * sum(all(h) for h in images.values()) / len(images)
    categories[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                       "questions": questions, "images": len(images)}
    group = _MME_GROUP.get(str(cat).lower().replace(" ", "_"), "other")
    sums[group] += acc + acc_plus
  return {"categories": categories, **sums, "total": sum(sums.values())}
