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
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from auditdm_jax.utils import answers

def _answer_key(text: str) -> str:
  """The comparison key of an answer: its VQA normalisation; when that is
  empty (the answer was only an article or punctuation, e.g. the letter "A"),
  the lowercased text without surrounding punctuation, marked so it can never
  equal a non-empty normalisation. Without this an empty prediction would
  "match" the gold letter "A" (both normalise to "")."""
  norm = answers.vqa_official(text)
  if norm:
    return norm
  return "\x00" + text.strip().lower().strip(string.punctuation + string.whitespace)


def _answers_list(answers, what: str = "answers") -> list[str]:
  if isinstance(answers, str):
    answers = [answers]
  answers = list(answers) if answers is not None else []
  if not answers:
    raise ValueError(f"{what}: the list of ground-truth answers is empty")
  for a in answers:
    if not isinstance(a, str):
      raise ValueError(f"{what}: every answer must be a str, got {type(a).__name__}")
  return answers


def _check_prediction(prediction) -> str:
  if not isinstance(prediction, str):
    raise ValueError(f"the prediction must be a str, got {type(prediction).__name__}")
  return prediction


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
  """VQA accuracy of one question (official VQA evaluation, VQAv2 / OK-VQA):
  after `answers.vqa_official` of the prediction and of every answer, for each of
  the n ground-truth answers leave it out and score min(#matches among the
  other n-1 / 3, 1); the accuracy is the mean over the n leave-one-out sets.

  With ten answers of which k match: k=1 -> 0.3, k=2 -> 0.6, k=3 -> 0.9,
  k>=4 -> 1.0. Fewer answers follow the same formula (3 answers that all
  match give 2/3). With a single answer the only leave-one-out set is empty
  and the official code would score every prediction 0; here a single answer
  is scored by exact normalised match (1.0 or 0.0) instead.

  The answers are normalised fully and always. (The official script only
  re-normalises ground truth whose answers disagree, and only its
  punctuation, because the released annotations are already normalised; on
  those annotations the two agree.) An answer that normalises to "" compares
  by its raw text (`_answer_key`), so an empty prediction never scores."""
  prediction = _check_prediction(prediction)
  answers = _answers_list(answers)
  pred = _answer_key(prediction)
  hits = [_answer_key(a) == pred for a in answers]
  if len(answers) == 1:
    return float(hits[0])
  total = sum(hits)
  # Leaving out a matching answer leaves total-1 matches, any other leaves total.
  acc = sum(min(1.0, (total - h) / 3.0) for h in hits) / len(hits)
  return float(acc)


def exact_match(prediction: str, answers: list[str]) -> float:
  """1.0 when the normalised prediction equals any normalised answer (GQA's
  official accuracy: exact match with the single gold answer; normalisation
  as `answers.vqa_official`, the way lmms-eval prepares GQA answers). `answers` may
  be a single str."""
  prediction = _check_prediction(prediction)
  answers = _answers_list(answers)
  pred = _answer_key(prediction)
  return float(any(_answer_key(a) == pred for a in answers))


# ---------------------------------------------------------------------------
# ANLS (DocVQA) and relaxed accuracy (ChartQA)
# ---------------------------------------------------------------------------


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
  prediction = _check_prediction(prediction)
  answers = _answers_list(answers)
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
  prediction = _check_prediction(prediction).strip()
  if not isinstance(target, str):
    raise ValueError(f"the ChartQA target must be a str, got {type(target).__name__}")
  target = target.strip()
  pred_num, target_num = _to_number(prediction), _to_number(target)
  if pred_num is not None and target_num:
    return float(abs(pred_num - target_num) / abs(target_num) <= tolerance)
  return float(prediction.lower() == target.lower())


# ---------------------------------------------------------------------------
# Multiple choice (AI2D, SEED-Bench, MMBench, MMStar, MMT-Bench, MMMU, ...)
# ---------------------------------------------------------------------------

_WHOLE_LETTER = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?")
_LEADING_LETTER = re.compile(r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.):\]])(?=\s|$)")
_STATED_LETTER = re.compile(
    r"\b(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*[(\[]?([A-Z])[)\]]?(?![\w'])")
_LETTER_SEPARATORS = re.compile(r"[.()\[\],:;!?*#{}\"]")


def _option_letters(options) -> str:
  if isinstance(options, str) or not isinstance(options, Sequence) or not options:
    raise ValueError("options must be a non-empty list of option texts")
  if len(options) > 26:
    raise ValueError(f"{len(options)} options; at most 26 (A-Z) are supported")
  for o in options:
    if not isinstance(o, str):
      raise ValueError(f"every option must be a str, got {type(o).__name__}")
  return string.ascii_uppercase[:len(options)]


def choice_letter(prediction: str, options: list[str]) -> str | None:
  """The option letter ("A", "B", ...) a free-form answer picks, or None
  when it picks none or is ambiguous. `options[i]` is the text of letter i.

  Tried in order (a rule that finds exactly one valid letter decides):
    1. the whole answer is one option's text (after `answers.vqa_official`);
    2. the whole answer is a letter: "B", "b", "(B)", "[B]", "B.", "B:";
    3. a leading letter with a delimiter: "(B) dog", "B. dog", "B) dog";
    4. a stated letter: "The answer is B", "Answer: (C)", "option D";
    5. exactly one distinct standalone capital letter among the option
       letters (VLMEvalKit's `can_infer_option`: the text split at
       punctuation and spaces); a sentence-initial "A" followed by a
       lowercase word may be the article, so then rule 6 is tried first and
       "A" is the fallback;
    6. exactly one option whose normalised text occurs, as whole words, in
       the normalised answer (VLMEvalKit's `can_infer_text`).
  Letters beyond the number of options never count. Unlike VLMEvalKit there
  is no LLM judge, and unlike MMMU's official parser no random guess for an
  unparseable answer (None scores as wrong)."""
  prediction = _check_prediction(prediction)
  letters = _option_letters(options)
  text = prediction.strip()
  if not text:
    return None
  keys = [_answer_key(o) for o in options]

  key = _answer_key(text)
  exact = [l for l, k in zip(letters, keys) if k == key]
  if len(exact) == 1:
    return exact[0]

  m = _WHOLE_LETTER.fullmatch(text)
  if m:
    letter = m.group(1).upper()
    return letter if letter in letters else None

  m = _LEADING_LETTER.match(text)
  if m:
    letter = next(g for g in m.groups() if g).upper()
    if letter in letters:
      return letter

  stated = {g for g in _STATED_LETTER.findall(text) if g in letters}
  if len(stated) == 1:
    return stated.pop()

  tokens = _LETTER_SEPARATORS.sub(" ", text).split()
  article_a = (len(tokens) > 1 and tokens[0] == "A" and tokens[1][:1].islower()
               and tokens.count("A") == 1)
  standalone = {t for t in tokens if len(t) == 1 and t in letters}
  if article_a:
    standalone.discard("A")
  if len(standalone) == 1:
    return standalone.pop()

  norm = " " + answers.vqa_official(text) + " "
  contained = [l for l, o in zip(letters, options)
               if (k := answers.vqa_official(o)) and f" {k} " in norm]
  if len(contained) == 1:
    return contained[0]
  if article_a and not standalone and "A" in letters:
    return "A"
  return None


def _gold_letter(answer, options) -> str:
  """The gold letter of a multiple-choice record: a letter ("B"), a 0-based
  index (1), or the text of one option."""
  letters = _option_letters(options)
  if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
    if not 0 <= answer < len(letters):
      raise ValueError(f"answer index {answer} is outside the {len(letters)} options")
    return letters[int(answer)]
  if isinstance(answer, str):
    a = answer.strip()
    if len(a) == 1 and a.upper() in letters:
      return a.upper()
    matches = [l for l, o in zip(letters, options) if o.strip() == a]
    if len(matches) == 1:
      return matches[0]
  raise ValueError(f"answer {answer!r} is not an option letter, index or option text "
                   f"(options: {list(options)!r})")


def circular_accuracy(groups) -> float:
  """MMBench CircularEval (Liu et al. 2023; VLMEvalKit): a question with N
  options is asked N times with its options rotated, and it counts only if
  every pass picks the right option. Returns the fraction of questions
  (groups) whose passes are all correct, in [0, 1].

  Input: one group per original question, either a mapping {question id:
  passes} or an iterable of passes, where passes is a non-empty list of
  (predicted_letter, correct_letter) pairs, one per circular pass. A
  predicted letter of None (unparseable) is wrong; letters compare
  case-insensitively."""
  items = groups.values() if isinstance(groups, Mapping) else groups
  n = ok = 0
  for passes in items:
    passes = list(passes)
    if not passes:
      raise ValueError(f"group {n} has no passes")
    good = True
    for pair in passes:
      if isinstance(pair, str) or len(pair) != 2:
        raise ValueError(f"group {n}: a pass must be a (predicted, correct) pair, got {pair!r}")
      pred, gold = pair
      if gold is None:
        raise ValueError(f"group {n}: a pass has no correct letter")
      good &= pred is not None and str(pred).strip().upper() == str(gold).strip().upper()
    n += 1
    ok += good
  if n == 0:
    raise ValueError("no groups to score")
  return ok / n


# ---------------------------------------------------------------------------
# Yes/no benchmarks: POPE and MME
# ---------------------------------------------------------------------------


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
  prediction = _check_prediction(prediction)
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
  pred = _check_prediction(prediction).strip().lower()
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


# ---------------------------------------------------------------------------
# RefCOCO: PaliGemma location tokens
# ---------------------------------------------------------------------------

_LOC_BOX = re.compile(r"<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>")
LOC_BINS = 1024


def _image_wh(image_size) -> tuple[float, float]:
  if (isinstance(image_size, (int, float, np.integer, np.floating))
      and not isinstance(image_size, bool)):
    w = h = float(image_size)
  elif isinstance(image_size, Sequence) and len(image_size) == 2:
    w, h = (float(v) for v in image_size)
  else:
    raise ValueError(f"image_size must be (width, height) or one int, got {image_size!r}")
  if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
    raise ValueError(f"image_size must be positive, got {image_size!r}")
  return w, h


def decode_loc_box(prediction: str, image_size) -> tuple[float, float, float, float] | None:
  """The first box a PaliGemma answer names, as (x1, y1, x2, y2) in pixels,
  or None. A box is four consecutive `<locNNNN>` tokens in the order y1, x1,
  y2, x2, each one of 1024 bins over the image height or width; as
  big_vision decodes them (the PaliGemma segmentation/detection evaluator)
  bin v is the normalised coordinate v / 1023 (the encoder rounds c * 1023),
  then scaled by the image size. The box is invalid (None) when a bin is
  outside 0..1023 or when y2 <= y1 or x2 <= x1, as big_vision rejects it.
  (Dividing by 1024, as some model cards do, moves coordinates by < 0.1%.)
  `image_size` is (width, height) in pixels, or one int for a square."""
  prediction = _check_prediction(prediction)
  w, h = _image_wh(image_size)
  m = _LOC_BOX.search(prediction)
  if m is None:
    return None
  y1, x1, y2, x2 = (int(g) for g in m.groups())
  if max(y1, x1, y2, x2) >= LOC_BINS or y2 <= y1 or x2 <= x1:
    return None
  scale = LOC_BINS - 1
  return (x1 / scale * w, y1 / scale * h, x2 / scale * w, y2 / scale * h)


def box_iou(a, b) -> float:
  """IoU of two (x1, y1, x2, y2) boxes."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _coco_box(box) -> tuple[float, float, float, float]:
  if isinstance(box, np.ndarray):
    box = box.tolist()
  if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
    raise ValueError(f"box must be [x, y, width, height] (COCO, pixels), got {box!r}")
  x, y, bw, bh = (float(v) for v in box)
  if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw <= 0 or bh <= 0:
    raise ValueError(f"box {box!r} must be finite with positive width and height")
  return (x, y, x + bw, y + bh)


def refcoco_accuracy(prediction: str, box, image_size, iou_threshold: float = 0.5) -> float:
  """RefCOCO/+/g referring-expression localisation, Acc@0.5: 1.0 when the
  box the answer names (`decode_loc_box`) has IoU >= 0.5 with the gold box
  (big_vision's `boxacc/0.5`), else 0.0; an answer with no valid box is 0.0.

  `box` is the COCO/RefCOCO annotation: [x, y, width, height] in pixels of
  the original image, top-left origin (a list, tuple or array of 4 numbers).
  `image_size` is that image's (width, height), or one int for a square.
  (IoU does not change when both boxes are rescaled per axis, so computing it
  in pixels equals big_vision's computation in normalised coordinates.)"""
  gold = _coco_box(box)
  pred = decode_loc_box(prediction, image_size)
  if pred is None:
    return 0.0
  return float(box_iou(pred, gold) >= iou_threshold)


# ---------------------------------------------------------------------------
# CIDEr-D (COCO captions)
# ---------------------------------------------------------------------------

# PTBTokenizer tokens that pycocoevalcap drops after tokenising.
PTB_PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"})
# Single characters that the Java tokenizer turns into one of the tokens above
# (quotes become `` / '', brackets become -LRB- ...), also dropped here.
_PTB_DROPPED_CHARS = frozenset(".?!,:;-'`\"()[]{}")
_CLITIC_NT = re.compile(r"(\w)n't\b")
_CLITIC = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
_CANNOT = re.compile(r"\bcannot\b")
_PTB_TOKEN = re.compile(r"n't\b|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,/]\d+)+|\w+(?:[-']\w+)*|\S")


def caption_tokens(text: str) -> list[str]:
  """A caption tokenised approximately as pycocoevalcap's PTBTokenizer
  (Stanford PTBTokenizer, -lowerCase) followed by its punctuation filter:
  lowercase; clitics split off ("don't" -> "do n't", "dog's" -> "dog 's",
  "cannot" -> "can not"); numbers with inner "." "," "/" kept whole ("3.5",
  "1,000", "1/2"); hyphenated words kept whole ("black-and-white"); every
  other punctuation mark its own token; then the marks in PTB_PUNCTUATION
  (and quotes and brackets, which the Java tokenizer escapes into them)
  dropped. Symbols such as "&", "$", "%", "#", "/" stay as tokens.

  Known differences from the Java tokenizer: abbreviations keep their periods
  there ("u.s.", "mr.") and lose them here ("u s", "mr"); its rarer splits
  ("gonna" -> "gon na") and Unicode normalisation (curly quotes, dashes,
  ellipsis characters) are not reproduced; brackets are always dropped."""
  text = text.replace("\n", " ").lower()
  text = _CANNOT.sub("can not", text)
  text = _CLITIC_NT.sub(r"\1 n't", text)
  text = _CLITIC.sub(r"\1 '\2", text)
  return [t for t in _PTB_TOKEN.findall(text)
          if t not in PTB_PUNCTUATION and t not in _PTB_DROPPED_CHARS]


def _ngrams(tokens: list[str], n: int) -> Counter:
  counts = Counter()
  for k in range(1, n + 1):
    for i in range(len(tokens) - k + 1):
      counts[tuple(tokens[i:i + k])] += 1
  return counts


def cider_per_image(predictions: Mapping, references: Mapping, n: int = 4,
                    sigma: float = 6.0) -> dict:
  """CIDEr-D of every image, {image id: score} (see `cider`)."""
  if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
    raise ValueError("predictions and references must be mappings keyed by image id")
  missing = [k for k in references if k not in predictions]
  extra = [k for k in predictions if k not in references]
  if missing or extra:
    raise ValueError(f"predictions and references must cover the same images: "
                     f"no prediction for {missing[:5]!r}, no references for {extra[:5]!r}")
  if not references:
    raise ValueError("no images to score")
  hyps, refs = {}, {}
  for key, caps in references.items():
    if isinstance(caps, str) or not caps:
      raise ValueError(f"image {key!r}: references must be a non-empty list of captions")
    refs[key] = [_ngrams(caption_tokens(_check_prediction(c)), n) for c in caps]
    hyps[key] = _ngrams(caption_tokens(_check_prediction(predictions[key])), n)

  # Document frequency: in how many images' reference sets an n-gram occurs.
  df = Counter()
  for grams in refs.values():
    df.update(set().union(*grams))
  log_images = math.log(len(refs))

  def tfidf(counts):
    vec = [dict() for _ in range(n)]
    for gram, tf in counts.items():
      vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(v * v for v in d.values())) for d in vec]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, norms, length

  scores = {}
  for key, hyp in hyps.items():
    h_vec, h_norm, h_len = tfidf(hyp)
    total = np.zeros(n)
    for ref in refs[key]:
      r_vec, r_norm, r_len = tfidf(ref)
      penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
      for k in range(n):
        dot = sum(min(w, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0)
                  for g, w in h_vec[k].items())
        if h_norm[k] and r_norm[k]:
          dot /= h_norm[k] * r_norm[k]
        total[k] += dot * penalty
    scores[key] = float(10.0 * total.mean() / len(refs[key]))
  return scores


def cider(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
  """Corpus CIDEr-D as the COCO caption evaluation reports it (pycocoevalcap
  `Cider`, whose `CiderScorer` is CIDEr-D; big_vision's and lmms-eval's COCO
  evaluators call it), on `caption_tokens` tokenisation.

  n-grams n = 1..4; tf-idf weights tf * (log #images - log max(1, df)),
  where df counts the images whose reference set contains the n-gram (so
  the IDF comes from the references only, and a one-image corpus scores 0);
  per n, the cosine between candidate and reference vectors with the
  candidate's weights clipped at the reference's in the dot product; a
  Gaussian length penalty exp(-d^2 / (2 * 6^2)) with d the difference in
  *bigram* counts (as pycocoevalcap counts length; for non-empty captions
  the same as the token-count difference); the mean over n, the
  mean over an image's references, x10; then the mean over images.

  Returns the raw value (a good model scores ~1.4); papers print it x100
  (`aggregate("cider", ...)`). `predictions` maps image id -> caption,
  `references` image id -> captions; both must cover the same ids."""
  scores = cider_per_image(predictions, references)
  return float(np.mean(list(scores.values())))


# ---------------------------------------------------------------------------
# The evaluator API: per-record score and corpus aggregate
# ---------------------------------------------------------------------------

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
    return _answers_list(record["answers"], f"{metric}: 'answers'")
  if isinstance(record, Mapping) and "answer" in record:
    return _answers_list(record["answer"], f"{metric}: 'answer'")
  return _answers_list(_field(record, "answers", metric))


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
  prediction = _check_prediction(prediction)
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
    gold = _gold_letter(_field(record, "answer", metric), options)
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
    gold = _gold_letter(_field(r, "answer", metric), options)
    groups[_field(r, "group", metric)].append((choice_letter(r["prediction"], options), gold))
  out.update(score=100.0 * circular_accuracy(groups), groups=len(groups))
  return out
