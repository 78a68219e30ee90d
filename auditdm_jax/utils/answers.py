"""Answer normalisation, in two named forms (no package imports).

- `vqa_official`: an answer as the official VQA evaluation compares it
  (GT-Vision-Lab/VQA `vqaEval.py`, EvalAI's processor), quirks included, so
  that real benchmark scores (`eval/metrics/`) are the published ones.
- `answer_key`: the key two models' answers are compared by (the reward's
  consensus and disagreement, mining, failure types, the scene world's
  benchmark). It has to make "Two." and "2" one answer whatever the context,
  so it departs from the official rule where that rule depends on context or
  keeps distinctions no comparison wants: every punctuation mark becomes a
  space (the official rule deletes a mark that touches a space and keeps ":"
  and "'"), number words up to twelve become digits (the official list stops
  at ten), and contractions are left as written (the official rule restores
  "dont" to "don't").

Both lowercase, drop the articles a/an/the, map number words to digits and
collapse whitespace.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------
# VQA answer normalisation (official VQA evaluation, as run on EvalAI)
# ---------------------------------------------------------------------------

# The official contractions table (GT-Vision-Lab/VQA vqaEval.py, straight
# apostrophes as in the current release and in EvalAI's processor), written as
# "key value" pairs. Kept verbatim, quirks included: the capitalised keys
# ("Im", "Ive", "Id've", "I'dve") never fire because words are lowercased
# first, and "somebody'd" maps to "somebodyd".
_CONTRACTION_PAIRS = """
aint ain't  arent aren't  cant can't  couldve could've  couldnt couldn't
couldn'tve couldn't've  couldnt've couldn't've  didnt didn't  doesnt doesn't
dont don't  hadnt hadn't  hadnt've hadn't've  hadn'tve hadn't've  hasnt hasn't
havent haven't  hed he'd  hed've he'd've  he'dve he'd've  hes he's  howd how'd
howll how'll  hows how's  Id've I'd've  I'dve I'd've  Im I'm  Ive I've
isnt isn't  itd it'd  itd've it'd've  it'dve it'd've  itll it'll  let's let's
maam ma'am  mightnt mightn't  mightnt've mightn't've  mightn'tve mightn't've
mightve might've  mustnt mustn't  mustve must've  neednt needn't  notve not've
oclock o'clock  oughtnt oughtn't  ow's'at 'ow's'at  'ows'at 'ow's'at
'ow'sat 'ow's'at  shant shan't  shed've she'd've  she'dve she'd've
she's she's  shouldve should've  shouldnt shouldn't  shouldnt've shouldn't've
shouldn'tve shouldn't've  somebody'd somebodyd  somebodyd've somebody'd've
somebody'dve somebody'd've  somebodyll somebody'll  somebodys somebody's
someoned someone'd  someoned've someone'd've  someone'dve someone'd've
someonell someone'll  someones someone's  somethingd something'd
somethingd've something'd've  something'dve something'd've
somethingll something'll  thats that's  thered there'd  thered've there'd've
there'dve there'd've  therere there're  theres there's  theyd they'd
theyd've they'd've  they'dve they'd've  theyll they'll  theyre they're
theyve they've  twas 'twas  wasnt wasn't  wed've we'd've  we'dve we'd've
weve we've  werent weren't  whatll what'll  whatre what're  whats what's
whatve what've  whens when's  whered where'd  wheres where's  whereve where've
whod who'd  whod've who'd've  who'dve who'd've  wholl who'll  whos who's
whove who've  whyll why'll  whyre why're  whys why's  wont won't
wouldve would've  wouldnt wouldn't  wouldnt've wouldn't've
wouldn'tve wouldn't've  yall y'all  yall'll y'all'll  y'allll y'all'll
yall'd've y'all'd've  y'alld've y'all'd've  y'all'dve y'all'd've  youd you'd
youd've you'd've  you'dve you'd've  youll you'll  youre you're  youve you've
"""
_words = _CONTRACTION_PAIRS.split()
VQA_CONTRACTIONS: dict[str, str] = dict(zip(_words[0::2], _words[1::2]))
del _words

# Number words the official evaluation maps to digits: none..ten, nothing else
# ("eleven" stays "eleven").
VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
VQA_ARTICLES = frozenset({"a", "an", "the"})
# The official punctuation list (":" and "'" are not in it; "." has its own rule).
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
                   "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (no-op)
# lookahead, not a lookbehind, so the effective rule is "a period not followed
# by a digit is removed" ("3.5" and ".5" keep theirs, "3." and "end." lose it).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text: str) -> str:
  """The official punctuation step. Every listed mark is deleted when the
  text has a digit-comma-digit anywhere ("1,000" -> "1000") or when that mark
  touches a space somewhere in the (original) text; otherwise it becomes a
  space ("x-ray" -> "x ray"). Then periods not followed by a digit go."""
  strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for mark in VQA_PUNCTUATION:
    if strip_all or (mark + " ") in text or (" " + mark) in text:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _vqa_digits_articles(text: str) -> str:
  """Lowercase, number words to digits, articles dropped, then contractions
  restored word by word (in that order, as the official evaluation does)."""
  words = []
  for word in text.lower().split():
    word = VQA_NUMBER_WORDS.get(word, word)
    if word not in VQA_ARTICLES:
      words.append(word)
  return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def vqa_official(text: str) -> str:
  """An answer as the official VQA evaluation compares it (GT-Vision-Lab/VQA
  `vqaEval.py`, the processing EvalAI runs): newlines and tabs to spaces,
  strip, the punctuation rule (`_vqa_punctuation`), number words none..ten to
  digits, articles a/an/the removed, contractions restored ("dont" ->
  "don't"), lowercase, single spaces.

  "Two dogs." -> "2 dogs"; "1,000" -> "1000"; "3.5" -> "3.5"; "eleven" ->
  "eleven"; "The cat" -> "cat"."""
  if not isinstance(text, str):
    raise ValueError(f"an answer must be a str, got {type(text).__name__}")
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _vqa_digits_articles(_vqa_punctuation(text))


# ---------------------------------------------------------------------------
# The comparison key of models' answers
# ---------------------------------------------------------------------------

_KEY_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
     "twelve"])}
_KEY_DIGIT_WORDS = {d: w for w, d in _KEY_NUMBER_WORDS.items()}
_KEY_PUNCT = re.compile(r"[!\"#$%&'()*+,\-/:;<=>?@\[\\\]^_`{|}~]")
_KEY_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def answer_key(text: str) -> str:
  """The key two answers are compared by: lowercase; every punctuation mark
  (but not a decimal point) becomes a space; articles dropped; number words up
  to twelve become digits; whitespace collapsed. "The Two." -> "2"."""
  t = _KEY_PERIOD.sub(" ", _KEY_PUNCT.sub(" ", str(text).lower()))
  return " ".join(_KEY_NUMBER_WORDS.get(w, w) for w in t.split() if w not in VQA_ARTICLES)


def spoken_key(text: str) -> str:
  """`answer_key` with counts written as words ("2" -> "two"), for a reader
  whose vocabulary has no digits."""
  return " ".join(_KEY_DIGIT_WORDS.get(w, w) for w in answer_key(text).split())
