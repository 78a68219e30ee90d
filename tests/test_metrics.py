"""Benchmark metrics against values worked out by hand from the official
definitions (VQA, GQA, DocVQA ANLS, ChartQA, MMBench, POPE, MME, RefCOCO with
PaliGemma loc tokens, CIDEr-D)."""

import math
import random

import numpy as np
import pytest

from auditdm_jax.eval import metrics as M
from auditdm_jax.utils import answers

# ---------------------------------------------------------------------------
# VQA normalisation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("dont", "don't"),              # contraction restored
    ("isnt", "isn't"),
    ("Two dogs.", "2 dogs"),        # number word, period at the end
    ("none", "0"),
    ("Ten", "10"),
    ("eleven", "eleven"),           # not in the official map
    ("1,000", "1000"),              # comma between digits
    ("e-mail, 2,000", "email 2000"),  # a digit comma deletes every mark
    ("hello,world", "hello world"),  # a mark touching no space becomes a space
    ("x-ray", "x ray"),
    ("cats / dogs", "cats dogs"),    # a mark next to a space is deleted
    ("3.5", "3.5"),                 # period before a digit stays
    ("3.", "3"),
    ("The cat!", "cat"),            # article and "!" go
    ("an apple", "apple"),
    ("red\ncar\tpark", "red car park"),
    ("what is it?", "what is it"),
    ("Yes", "yes"),
    ("Im", "im"),                   # the official key is "Im": dead after lowercasing
])
def test_vqa_official(text, expected):
  assert answers.vqa_official(text) == expected


def test_vqa_official_rejects_non_strings():
  with pytest.raises(ValueError, match="str"):
    answers.vqa_official(None)


# ---------------------------------------------------------------------------
# VQA accuracy, exact match
# ---------------------------------------------------------------------------


def _loo(k, n=10):
  """The official leave-one-out value by hand: the k matching answers each
  leave k-1 matches, the n-k others leave k."""
  return (k * min(1, (k - 1) / 3) + (n - k) * min(1, k / 3)) / n


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                         (5, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(k, expected):
  answers = ["yes"] * k + ["no"] * (10 - k)
  assert _loo(k) == pytest.approx(expected)
  assert M.vqa_accuracy("yes", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
  answers = ["2"] * 3 + ["3"] * 7
  assert M.vqa_accuracy("Two.", answers) == pytest.approx(0.9)
  assert M.vqa_accuracy("two", ["Two"] * 10) == pytest.approx(1.0)
  assert M.vqa_accuracy("1,000", ["1000"] * 2 + ["100"] * 8) == pytest.approx(0.6)


def test_vqa_accuracy_fewer_than_ten_answers():
  # One answer: the leave-one-out set is empty; exact normalised match instead.
  assert M.vqa_accuracy("The Dog", ["dog"]) == 1.0
  assert M.vqa_accuracy("cat", ["dog"]) == 0.0
  # Two matching answers: each leave-one-out set holds 1 match -> 1/3.
  assert M.vqa_accuracy("dog", ["dog", "dog"]) == pytest.approx(1 / 3)
  # Three matching: 2 left each time -> 2/3. Three of five: (3*2/3 + 2*1) / 5.
  assert M.vqa_accuracy("dog", ["dog"] * 3) == pytest.approx(2 / 3)
  assert M.vqa_accuracy("dog", ["dog"] * 3 + ["cat"] * 2) == pytest.approx(0.8)


def test_vqa_accuracy_empty_prediction_and_empty_answers():
  assert M.vqa_accuracy("", ["yes"] * 10) == 0.0
  # "a" normalises to "" like an empty prediction, but they must not match.
  assert M.vqa_accuracy("", ["a"]) == 0.0
  with pytest.raises(ValueError, match="empty"):
    M.vqa_accuracy("yes", [])


def test_exact_match():
  assert M.exact_match("The Dog.", ["dog"]) == 1.0
  assert M.exact_match("dogs", ["dog"]) == 0.0
  assert M.exact_match("left", ["right", "left"]) == 1.0
  assert M.exact_match("two", "2") == 1.0
  assert M.exact_match("A", ["A"]) == 1.0     # a letter answer survives normalisation
  assert M.exact_match("", ["A"]) == 0.0
  assert M.exact_match("B", ["A"]) == 0.0
  with pytest.raises(ValueError, match="empty"):
    M.exact_match("x", [])


# ---------------------------------------------------------------------------
# ANLS, relaxed accuracy
# ---------------------------------------------------------------------------


def test_levenshtein():
  assert M.levenshtein("kitten", "sitting") == 3
  assert M.levenshtein("", "abc") == 3
  assert M.levenshtein("abc", "abc") == 0


def test_vqa_official_keeps_contractions_as_the_official_script_does():
  # vqaEval.py keeps an apostrophe inside a word; lmms-eval would give "it 's"
  assert answers.vqa_official("it's red.") == "it's red"
  assert answers.vqa_official("dont") == "don't"


def test_anls():
  assert M.anls("Hello World", ["hello world"]) == 1.0            # case
  assert M.anls("helo", ["hello"]) == pytest.approx(1 - 1 / 5)    # one edit of 5
  assert M.anls("abxy", ["abcd"]) == 0.0                          # NL = 0.5 exactly: 0
  assert M.anls("aagexa", ["page 3"]) == 0.0                      # the case, NL 0.5
  assert M.anls("abcx", ["abcd"]) == pytest.approx(0.75)          # NL 0.25 < 0.5: kept
  assert M.anls("abxy", ["abcd"], threshold=0.6) == pytest.approx(0.5)
  assert M.anls("axyze", ["abcde"]) == 0.0                        # NL = 0.6 -> 0
  assert M.anls("xyz", ["abc"]) == 0.0
  # Max over answers; a tie gives the same value either way.
  assert M.anls("helo", ["xyz", "hello"]) == pytest.approx(0.8)
  assert M.anls("ab", ["ax", "xb"]) == 0.0                       # NL 0.5 for both
  assert M.anls("", ["abc"]) == 0.0
  assert M.anls("", [""]) == 1.0
  # Official: lengths before normalisation (trailing space lengthens the
  # denominator): normalised "abc" vs "abd" is 1 edit over max(4, 3).
  assert M.anls("abc ", ["abd"]) == pytest.approx(1 - 1 / 4)
  with pytest.raises(ValueError, match="empty"):
    M.anls("x", [])


@pytest.mark.parametrize("prediction, target, expected", [
    ("104.9", "100", 1.0), ("105", "100", 1.0), ("105.1", "100", 0.0),
    ("95", "100", 1.0), ("94.9", "100", 0.0), ("-10.4", "-10", 1.0),
    ("0", "0", 1.0), ("0.0", "0", 0.0), ("0.01", "0", 0.0),   # a 0 target needs "0"
    ("5%", "0.05", 1.0), ("5%", "5", 0.0), ("12.4%", "12%", 1.0), ("12%", "12.4", 0.0),
    ("Yes", "yes", 1.0), ("Japan ", "japan", 1.0), ("China", "Japan", 0.0),
    ("1,000", "1000", 0.0),  # not a number in the reference; compared as text
    ("", "10", 0.0),
])
def test_relaxed_accuracy(prediction, target, expected):
  assert M.relaxed_accuracy(prediction, target) == expected


# ---------------------------------------------------------------------------
# Multiple choice, circular evaluation
# ---------------------------------------------------------------------------

OPTS = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize("prediction, expected", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("[C]", "C"),
    ("B) dog", "B"), ("(C) bird", "C"), ("D. fish", "D"),
    ("The answer is C", "C"), ("The answer is C.", "C"), ("Answer: (D)", "D"),
    ("dog", "B"), ("The dog.", "B"), ("A dog", "B"),
    ("I think it is a bird sitting there", "C"),
    ("A", "A"), ("A is correct", "A"),
    ("cat or dog", None), ("B and C", None), ("", None), ("   ", None),
    ("E", None), ("zebra", None),
])
def test_choice_letter(prediction, expected):
  assert M.choice_letter(prediction, OPTS) == expected


def test_choice_letter_nested_options():
  opts = ["red", "red car", "blue"]
  assert M.choice_letter("red car", opts) == "B"
  assert M.choice_letter("the red car on the left", opts) is None  # both contained
  with pytest.raises(ValueError, match="options"):
    M.choice_letter("A", [])


def test_circular_accuracy():
  groups = {"q1": [("A", "A"), ("B", "B"), ("C", "C")],
            "q2": [("A", "A"), ("C", "B")],        # one pass wrong: the question fails
            "q3": [(None, "A"), ("A", "A")],       # an unparseable pass is wrong
            "q4": [("b", "B")]}
  assert M.circular_accuracy(groups) == pytest.approx(2 / 4)
  assert M.circular_accuracy(list(groups.values())) == pytest.approx(2 / 4)
  with pytest.raises(ValueError, match="no passes"):
    M.circular_accuracy([[("A", "A")], []])
  with pytest.raises(ValueError, match="no groups"):
    M.circular_accuracy({})


# ---------------------------------------------------------------------------
# POPE, MME
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, expected", [
    ("Yes", "yes"), ("Yes, there is a dog.", "yes"), ("No.", "no"), ("no", "no"),
    ("There is not a dog in the image.", "no"), ("No, there is none", "no"),
    ("Yes. No.", "yes"),       # only the first sentence counts
    ("", "yes"),               # the official rule: anything without a negation is yes
    ("NO", "yes"),             # its word test is case-sensitive
    ("No\nthere is none", "no"),
])
def test_pope_answer(prediction, expected):
  assert M.pope_answer(prediction) == expected


def test_pope_scores_all_yes():
  s = M.pope_scores(["Yes"] * 6, ["yes", "yes", "yes", "no", "no", "no"])
  # tp 3, fp 3, tn 0, fn 0
  assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (3, 3, 0, 0)
  assert s["accuracy"] == pytest.approx(0.5)
  assert s["precision"] == pytest.approx(0.5)
  assert s["recall"] == pytest.approx(1.0)
  assert s["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
  assert s["yes_ratio"] == pytest.approx(1.0)


def test_pope_scores_mixed():
  preds = ["yes", "Yes.", "No", "no, it is not", "yes"]
  labels = ["yes", "no", "yes", "no", "YES"]
  s = M.pope_scores(preds, labels)
  assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (2, 1, 1, 1)
  assert s["accuracy"] == pytest.approx(3 / 5)
  assert s["precision"] == pytest.approx(2 / 3)
  assert s["recall"] == pytest.approx(2 / 3)
  assert s["f1"] == pytest.approx(2 / 3)
  assert s["yes_ratio"] == pytest.approx(3 / 5)
  # No positive predictions: precision and F1 are 0 instead of a division error.
  s = M.pope_scores(["no", "no"], ["yes", "no"])
  assert s["precision"] == 0.0 and s["f1"] == 0.0 and s["accuracy"] == 0.5


def test_pope_scores_bad_input():
  with pytest.raises(ValueError, match="'yes' or 'no'"):
    M.pope_scores(["yes"], ["maybe"])
  with pytest.raises(ValueError, match="labels"):
    M.pope_scores(["yes", "no"], ["yes"])
  with pytest.raises(ValueError, match="no predictions"):
    M.pope_scores([], [])


@pytest.mark.parametrize("prediction, expected", [
    ("yes", "yes"), ("Yes, it is.", "yes"), ("No", "no"), (" no. ", "no"),
    ("Not sure", "no"),   # "no" in the first four characters: the official rule
    ("maybe", "other"), ("", "other"),
])
def test_mme_answer(prediction, expected):
  assert M.mme_answer(prediction) == expected


def _mme_rows():
  rec = lambda c, i, p, a: {"category": c, "image_id": i, "prediction": p, "answer": a}
  return [
      # existence: image 1 both right, image 2 one right -> acc 3/4, acc+ 1/2
      rec("existence", "e1", "Yes", "yes"), rec("existence", "e1", "No", "no"),
      rec("existence", "e2", "Yes", "yes"), rec("existence", "e2", "Yes", "no"),
      # OCR: one image, both wrong -> 0
      rec("OCR", "o1", "no", "yes"), rec("OCR", "o1", "maybe", "no"),
      # code_reasoning: both right -> 100 + 100
      rec("code_reasoning", "c1", "yes", "yes"), rec("code_reasoning", "c1", "no", "no"),
      # not an official category: into "other" (acc 1/2, acc+ 0)
      rec("my_subset", "m1", "yes", "yes"), rec("my_subset", "m1", "yes", "no"),
  ]


def test_mme_scores():
  s = M.mme_scores(_mme_rows())
  ex = s["categories"]["existence"]
  assert ex["acc"] == pytest.approx(75.0)
  assert ex["acc_plus"] == pytest.approx(50.0)
  assert ex["score"] == pytest.approx(125.0)
  assert (ex["questions"], ex["images"]) == (4, 2)
  assert s["categories"]["OCR"]["score"] == 0.0
  assert s["categories"]["code_reasoning"]["score"] == pytest.approx(200.0)
  assert s["perception"] == pytest.approx(125.0 + 0.0)
  assert s["cognition"] == pytest.approx(200.0)
  assert s["other"] == pytest.approx(50.0)
  assert s["total"] == pytest.approx(375.0)


def test_mme_scores_needs_pairs():
  rows = _mme_rows()[:3]
  with pytest.raises(ValueError, match="pairs"):
    M.mme_scores(rows)
  s = M.mme_scores(rows, require_pairs=False)   # e2 has one question, right
  assert s["categories"]["existence"]["acc_plus"] == pytest.approx(100.0)
  with pytest.raises(ValueError, match="'yes' or 'no'"):
    M.mme_scores([{"category": "count", "image_id": 1, "prediction": "yes", "answer": "2"}])
  with pytest.raises(ValueError, match="image_id"):
    M.mme_scores([{"category": "count", "prediction": "yes", "answer": "yes"}])


# ---------------------------------------------------------------------------
# RefCOCO
# ---------------------------------------------------------------------------

LOC = "<loc0100><loc0200><loc0300><loc0400>"   # y1=100 x1=200 y2=300 x2=400 (bins)


def test_decode_loc_box():
  # On a 1023 x 1023 image a bin is a pixel.
  assert M.decode_loc_box(LOC + " dog", 1023) == pytest.approx((200, 100, 400, 300))
  assert M.decode_loc_box("left " + LOC, (2046, 1023)) == pytest.approx((400, 100, 800, 300))
  assert M.decode_loc_box("<loc0000><loc0000><loc1023><loc1023>", (640, 480)) == \
      pytest.approx((0, 0, 640, 480))


def test_refcoco_accuracy_threshold():
  # Same box: [x, y, w, h] = [200, 100, 200, 200].
  assert M.refcoco_accuracy(LOC, [200, 100, 200, 200], 1023) == 1.0
  # Half of it: intersection 200*100, union 200*200 -> IoU 0.5, a hit.
  assert M.refcoco_accuracy(LOC, [200, 100, 200, 100], 1023) == 1.0
  # 99 rows: IoU 19800 / 40000 < 0.5.
  assert M.refcoco_accuracy(LOC, (200, 100, 200, 99), 1023) == 0.0
  assert M.refcoco_accuracy(LOC, np.array([200, 100, 200, 99]), (1023, 1023)) == 0.0


def test_refcoco_accuracy_axis_order():
  # (y1, x1, y2, x2) = (0, 0, 1023, 512) on a 2046 x 1023 image is x 0..1024, y 0..1023.
  pred = "<loc0000><loc0000><loc1023><loc0512>"
  assert M.refcoco_accuracy(pred, [0, 0, 1024, 1023], (2046, 1023)) == 1.0
  # Read as (x1, y1, x2, y2) it would be x 0..2046, y 0..512: IoU ~ 1/3.
  assert M.refcoco_accuracy(pred, [0, 0, 2046, 512], (2046, 1023)) == 0.0


@pytest.mark.parametrize("prediction", [
    "", "a dog", "<loc0100><loc0200><loc0300>",            # three tokens
    "<loc0100><loc0200><loc1024><loc0400>",                # bin out of range
    "<loc0300><loc0200><loc0100><loc0400>",                # y2 <= y1
    "<loc0100><loc0400><loc0300><loc0400>",                # x2 <= x1
    "<loc100><loc200><loc300><loc400>",                    # not four digits
])
def test_refcoco_unparseable_is_zero(prediction):
  assert M.decode_loc_box(prediction, 1023) is None
  assert M.refcoco_accuracy(prediction, [200, 100, 200, 200], 1023) == 0.0


def test_refcoco_bad_box():
  with pytest.raises(ValueError, match="box"):
    M.refcoco_accuracy(LOC, [1, 2, 3], 1023)
  with pytest.raises(ValueError, match="positive"):
    M.refcoco_accuracy(LOC, [1, 2, 0, 3], 1023)
  with pytest.raises(ValueError, match="image_size"):
    M.refcoco_accuracy(LOC, [1, 2, 3, 4], (1023,))


# ---------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------


def test_caption_tokens():
  assert M.caption_tokens("A Red car.") == ["a", "red", "car"]
  assert M.caption_tokens("The dog's ball, isn't it?") == \
      ["the", "dog", "'s", "ball", "is", "n't", "it"]
  assert M.caption_tokens('a "big" (red) car -- 3.5 & 1,000') == \
      ["a", "big", "red", "car", "3.5", "&", "1,000"]


def test_cider_identical_two_words():
  # Two images, disjoint words: every reference n-gram has df 1, so every
  # weight is log 2; unigram and bigram cosines are 1, there are no 3/4-grams,
  # lengths agree: 10 * (1 + 1 + 0 + 0) / 4 = 5.
  preds = {"1": "red car", "2": "blue sky"}
  refs = {"1": ["red car"], "2": ["blue sky"]}
  assert M.cider(preds, refs) == pytest.approx(5.0)


def test_cider_identical_four_words():
  preds = {"a": "a red car parked", "b": "two blue birds flying"}
  refs = {"a": ["a red car parked"], "b": ["two blue birds flying"]}
  assert M.cider(preds, refs) == pytest.approx(10.0)


def test_cider_single_image_is_zero():
  # log(#images) = log 1 = 0 and every df is 1: all weights vanish.
  assert M.cider({"x": "a dog"}, {"x": ["a dog"]}) == 0.0


def test_cider_length_penalty_by_hand():
  # Image 1: hypothesis "red car parked" against "red car". Unigrams: hyp
  # weights (w, w, w) ("parked" has df 0 -> log max(1, 0) = 0, weight w too),
  # ref (w, w): cos = 2 / sqrt(3 * 2). Bigrams: hyp {red car, car parked},
  # ref {red car}: 1 / sqrt(2). Trigram: the reference has none -> 0. Bigram
  # lengths 2 vs 1: penalty exp(-1 / 72). Image 2 scores 5 as above.
  s1 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
  preds = {1: "red car parked", 2: "blue sky"}
  refs = {1: ["red car"], 2: ["blue sky"]}
  assert M.cider(preds, refs) == pytest.approx((s1 + 5.0) / 2)
  assert M.cider_per_image(preds, refs)[1] == pytest.approx(s1)


def test_cider_clips_repeated_words():
  # "red red car" vs "red car": unigram hyp (red 2w, car w), ref (w, w). The
  # dot product clips 2w to w: (w*w + w*w) / (sqrt(5) w * sqrt(2) w) =
  # 2 / sqrt(10) (unclipped would be 3 / sqrt(10)). Bigrams {red red, red car}
  # vs {red car}: 1 / sqrt(2). Bigram lengths 2 vs 1.
  s1 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4
  preds = {1: "red red car", 2: "blue sky"}
  refs = {1: ["red car"], 2: ["blue sky"]}
  assert M.cider_per_image(preds, refs)[1] == pytest.approx(s1)


def test_cider_averages_references_and_shares_idf():
  # Image 1 has two references: one identical (sims 1, 1, 0, 0), one disjoint
  # (0): 10 * mean(1, 1, 0, 0) / 2 = 2.5. Image 2 scores 5.
  preds = {1: "red car", 2: "blue sky"}
  refs = {1: ["red car", "green tree"], 2: ["blue sky"]}
  assert M.cider(preds, refs) == pytest.approx((2.5 + 5.0) / 2)
  # An n-gram in every image's references has idf log 2 - log 2 = 0: with
  # "car" in both images, only "red" and "red car" carry weight in image 1.
  preds = {1: "red car", 2: "blue car"}
  refs = {1: ["red car"], 2: ["blue car"]}
  assert M.cider(preds, refs) == pytest.approx(5.0)


def test_cider_tokenisation_and_key_order():
  preds = {"1": "A Red car.", "2": "blue, sky!"}
  refs = {"1": ["a red car"], "2": ["Blue sky"]}
  plain = M.cider({"1": "a red car", "2": "blue sky"}, refs)
  assert M.cider(preds, refs) == pytest.approx(plain)
  rng = random.Random(0)
  words = "a dog cat red blue man riding horse on street table sitting".split()
  preds = {i: " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for i in range(12)}
  refs = {i: [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(3)]
          for i in range(12)}
  order = list(preds)
  rng.shuffle(order)
  shuffled_p = {k: preds[k] for k in order}
  shuffled_r = {k: refs[k] for k in reversed(order)}
  assert M.cider(shuffled_p, shuffled_r) == pytest.approx(M.cider(preds, refs), abs=1e-12)
  assert M.cider(preds, refs) > 0


def test_cider_bad_input():
  with pytest.raises(ValueError, match="same images"):
    M.cider({"1": "a"}, {"1": ["a"], "2": ["b"]})
  with pytest.raises(ValueError, match="non-empty"):
    M.cider({"1": "a", "2": "b"}, {"1": ["a"], "2": []})
  with pytest.raises(ValueError, match="no images"):
    M.cider({}, {})


# ---------------------------------------------------------------------------
# The dispatcher
# ---------------------------------------------------------------------------


def test_registry_is_complete():
  assert set(M.METRICS) == set(M.RECORD_METRICS) | set(M.CORPUS_METRICS)
  assert set(M.UNITS) == set(M.METRICS) == set(M.FIELDS)


def test_score_per_record():
  assert M.score("vqa", "yes", {"answers": ["yes"] * 2 + ["no"] * 8}) == pytest.approx(0.6)
  assert M.score("vqa", "dog", {"answer": "Dog"}) == 1.0
  assert M.score("exact", "Left", {"answer": "left"}) == 1.0
  assert M.score("anls", "helo", {"answers": ["hello"]}) == pytest.approx(0.8)
  assert M.score("relaxed", "101", {"answer": "100"}) == 1.0
  assert M.score("choice", "(B)", {"options": OPTS, "answer": "B"}) == 1.0
  assert M.score("choice", "dog", {"options": OPTS, "answer": 1}) == 1.0
  assert M.score("choice", "dog", {"options": OPTS, "answer": "dog"}) == 1.0
  assert M.score("choice", "cat", {"options": OPTS, "answer": "B"}) == 0.0
  assert M.score("refcoco", LOC, {"box": [200, 100, 200, 200], "image_size": 1023}) == 1.0


def test_score_errors():
  with pytest.raises(ValueError, match="unknown metric"):
    M.score("bleu", "x", {})
  with pytest.raises(ValueError, match="aggregate"):
    M.score("cider", "x", {})
  with pytest.raises(ValueError, match="answers"):
    M.score("vqa", "x", {"question": "?"})
  with pytest.raises(ValueError, match="empty"):
    M.score("vqa", "x", {"answers": []})
  with pytest.raises(ValueError, match="options"):
    M.score("choice", "A", {"answer": "A"})
  with pytest.raises(ValueError, match="not an option"):
    M.score("choice", "A", {"options": OPTS, "answer": "F"})
  with pytest.raises(ValueError, match="prediction"):
    M.score("exact", None, {"answer": "x"})


def test_aggregate_per_record_metrics():
  rows = [{"prediction": "yes", "answers": ["yes"] * 10},
          {"prediction": "yes", "answers": ["yes"] * 2 + ["no"] * 8},
          {"prediction": "no", "answers": ["yes"] * 10}]
  out = M.aggregate("vqa", rows)
  assert out["score"] == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)
  assert (out["unit"], out["count"]) == ("%", 3)
  out = M.aggregate("anls", [{"prediction": "helo", "answers": ["hello"]},
                             {"prediction": "abc", "answers": ["abc"]}])
  assert out["score"] == pytest.approx(100 * (0.8 + 1.0) / 2)


def test_aggregate_corpus_metrics():
  out = M.aggregate("cider", [{"id": 1, "prediction": "red car", "references": ["red car"]},
                              {"id": 2, "prediction": "blue sky", "references": ["blue sky"]}])
  assert out["score"] == pytest.approx(500.0) and out["cider"] == pytest.approx(5.0)

  pope_rows = [{"prediction": "Yes", "answer": a} for a in ["yes", "yes", "no", "no"]]
  out = M.aggregate("pope", pope_rows)
  assert out["score"] == pytest.approx(100 * 2 / 3)      # F1 of all-yes on a balanced set
  assert out["accuracy"] == pytest.approx(50.0) and out["yes_ratio"] == pytest.approx(100.0)

  out = M.aggregate("mme", _mme_rows())
  assert out["score"] == pytest.approx(375.0) and out["perception"] == pytest.approx(125.0)

  # MMBench: each question asked once per rotation of its options.
  rows = [
      {"group": 1, "options": ["cat", "dog"], "answer": "A", "prediction": "A"},
      {"group": 1, "options": ["dog", "cat"], "answer": "B", "prediction": "cat"},
      {"group": 2, "options": ["red", "blue"], "answer": "B", "prediction": "B"},
      {"group": 2, "options": ["blue", "red"], "answer": "A", "prediction": "B"},  # fails
  ]
  out = M.aggregate("circular", rows)
  assert out["score"] == pytest.approx(50.0) and out["groups"] == 2


def test_aggregate_errors():
  with pytest.raises(ValueError, match="unknown metric"):
    M.aggregate("rouge", [{"prediction": "x"}])
  with pytest.raises(ValueError, match="no rows"):
    M.aggregate("vqa", [])
  with pytest.raises(ValueError, match="prediction"):
    M.aggregate("vqa", [{"answers": ["x"]}])
  with pytest.raises(ValueError, match="more than one row"):
    M.aggregate("cider", [{"id": 1, "prediction": "a", "references": ["a"]}] * 2)
  with pytest.raises(ValueError, match="'id'"):
    M.aggregate("cider", [{"prediction": "a", "references": ["a"]}])
