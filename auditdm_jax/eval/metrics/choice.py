"""Multiple choice (AI2D, SEED-Bench, MMBench, MMStar, MMT-Bench, MMMU, ...):
the letter a free-form answer picks, the gold letter, MMBench CircularEval."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

import numpy as np

from auditdm_jax.eval.metrics.common import answer_key, check_prediction
from auditdm_jax.utils import answers


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
  prediction = check_prediction(prediction)
  letters = _option_letters(options)
  text = prediction.strip()
  if not text:
    return None
  keys = [answer_key(o) for o in options]

  key = answer_key(text)
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


def gold_letter(answer, options) -> str:
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
