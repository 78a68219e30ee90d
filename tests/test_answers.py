"""The two named answer normalisations (utils/answers.py) and where they differ."""

import pytest

from auditdm_jax.scenes.questions import ANSWER_WORDS, NUMBERS
from auditdm_jax.utils import answers


@pytest.mark.parametrize("text,key", [
    ("The Two.", "2"), ("2", "2"), ("  a RED circle! ", "red circle"), ("twelve", "12"),
    ("3.5", "3.5"), ("end.", "end"), ("", ""), ("left/right", "left right"),
])
def test_answer_key(text, key):
  assert answers.answer_key(text) == key


@pytest.mark.parametrize("text,official,key", [
    ("it's red", "it's red", "it s red"),       # the official rule keeps "'"
    ("dont", "don't", "dont"),                  # and restores contractions
    ("eleven", "eleven", "11"),                 # its number words stop at ten
    ("yes: red", "yes: red", "yes red"),        # ":" is not in its list
    ("1,000", "1000", "1 000"),                 # a digit-comma-digit deletes every mark
])
def test_where_the_two_differ(text, official, key):
  assert answers.vqa_official(text) == official
  assert answers.answer_key(text) == key


def test_scene_answers_keep_their_identity_under_the_key():
  keys = {answers.answer_key(w): w for w in ANSWER_WORDS}
  assert len(keys) == len(set(ANSWER_WORDS)), "two scene answers share a key"
  for i, word in enumerate(NUMBERS):
    assert answers.answer_key(word) == answers.answer_key(str(i)) == str(i)
    assert answers.spoken_key(str(i)) == word


def test_vqa_official_refuses_non_text():
  with pytest.raises(ValueError, match="must be a str"):
    answers.vqa_official(3)
