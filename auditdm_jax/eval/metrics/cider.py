"""CIDEr-D (COCO captions) on an approximation of the PTB tokenizer."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping

import numpy as np

from auditdm_jax.eval.metrics.common import check_prediction


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
    refs[key] = [_ngrams(caption_tokens(check_prediction(c)), n) for c in caps]
    hyps[key] = _ngrams(caption_tokens(check_prediction(predictions[key])), n)

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
