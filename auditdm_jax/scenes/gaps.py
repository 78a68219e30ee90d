"""Planted capability gaps: slices of the question distribution a target model
is trained to get wrong (or never sees), which the auditor should discover.

A gap spec is `SKILL:FILTER`, SKILL one of questions.SKILLS. FILTER is one of

  *           every question of the skill                  colour:*
  WORD        the answer or any facet value equals WORD    spatial:left, binding:red
  KEY=WORD    facet KEY equals WORD; KEY is answer,        shape:colour=blue
              colour, shape or size                         binding:answer=small
  n OP INT    the count facet compared with INT, OP one    counting:n>=4
              of <, <=, >, >=, ==, != (counting only)

WORD must be a word of the world (a colour, shape, size, number word, yes/no,
left/right/above/below, bigger/smaller) that the skill can produce: an answer
word (number, yes/no, relation, comparison, or the attribute a skill answers
with) must be one of the skill's answers, so `spatial:bigger` is rejected,
and an n filter must select at least one possible count (0..8). Whitespace
around the tokens is ignored; `str(spec)` is the canonical form without it.

Facets are those of the question templates (questions.py): `answer`, the
subject's `colour` / `shape` / `size`, and `n` for counting. A record's facets
are a JSON object (examples.py).

Planting (`apply_gaps`): mode "corrupt" replaces the answer of every matching
training record by a systematic confusion (`corrupt_answer`), mode "remove"
drops the matching records.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from auditdm_jax.scenes.questions import (
  ANSWER_WORDS,
  COMPARISONS,
  NUMBERS,
  RELATIONS,
  SKILLS,
  YES_NO,
)
from auditdm_jax.scenes.world import COLOURS, MAX_OBJECTS, SHAPES, SIZES

FACET_KEYS = ("answer", "colour", "shape", "size")
COMPARE_OPS = ("<=", ">=", "==", "!=", "<", ">")
MODES = ("corrupt", "remove")
KINDS = ("all", "word", "facet", "count")
COUNTS = tuple(range(MAX_OBJECTS + 1))
# The answers each skill can give.
SKILL_ANSWERS = {
    "colour": COLOURS, "shape": SHAPES, "counting": NUMBERS[:MAX_OBJECTS + 1],
    "existence": YES_NO, "spatial": RELATIONS, "size": COMPARISONS,
    "binding": SIZES, "small_object": SHAPES,
}
assert tuple(SKILL_ANSWERS) == SKILLS
ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}
_ANSWER_ONLY = set(NUMBERS) | set(YES_NO) | set(RELATIONS) | set(COMPARISONS)
_N_FILTER = re.compile(r"^n\s*([<>=!~]+)\s*(.*)$")
_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


class GapSpecError(ValueError):
  """An invalid gap spec (or list of specs)."""


def _facets_dict(facets) -> dict:
  if isinstance(facets, str):
    return json.loads(facets)
  if isinstance(facets, Mapping):
    return dict(facets)
  return dict(facets)   # a Question's tuple of pairs


@dataclasses.dataclass(frozen=True)
class GapSpec:
  """One parsed spec. kind: "all" (`*`), "word" (WORD), "facet" (KEY=WORD) or
  "count" (n OP INT); key/op/value hold the filter's parts."""

  skill: str
  kind: str = "all"
  key: str | None = None
  op: str | None = None
  value: str | int | None = None

  def __post_init__(self):
    if self.skill not in SKILLS:
      raise GapSpecError(f"unknown skill {self.skill!r}; skills are {', '.join(SKILLS)}")
    if self.kind not in KINDS:
      raise GapSpecError(f"unknown filter kind {self.kind!r}; kinds are {KINDS}")

  @classmethod
  def parse(cls, text: str) -> GapSpec:
    if not isinstance(text, str):
      raise GapSpecError(f"gap spec {text!r} is not text")
    where = f"gap spec {text!r}"
    if not text.strip():
      raise GapSpecError(f"{where} is empty; the form is SKILL:FILTER")
    if ":" not in text:
      raise GapSpecError(f"{where} has no ':'; the form is SKILL:FILTER, e.g. "
                         "'counting:n>=4' or 'colour:*'")
    skill, filt = (p.strip() for p in text.split(":", 1))
    if skill not in SKILLS:
      raise GapSpecError(f"{where}: unknown skill {skill!r}; skills are "
                         f"{', '.join(SKILLS)}")
    if not filt:
      raise GapSpecError(f"{where}: empty filter; use '*' for every question")
    if filt == "*":
      return cls(skill)
    m = _N_FILTER.match(filt)
    if m:
      return cls._count(where, skill, *m.groups())
    if "=" in filt:
      key, word = (p.strip() for p in filt.split("=", 1))
      if key not in FACET_KEYS:
        raise GapSpecError(f"{where}: unknown facet {key!r}; facets are "
                           f"{', '.join(FACET_KEYS)} (and 'n OP INT' for counting)")
      vocab = SKILL_ANSWERS[skill] if key == "answer" else ATTRIBUTES[key]
      if word not in ANSWER_WORDS:
        raise GapSpecError(f"{where}: unknown word {word!r}; {key}s of {skill} "
                           f"questions are {', '.join(vocab)}")
      if word not in vocab:
        raise GapSpecError(f"{where}: {word!r} is not a possible {key} of a {skill} "
                           f"question; those are {', '.join(vocab)}")
      return cls(skill, "facet", key, "==", word)
    word = filt
    if word not in ANSWER_WORDS:
      raise GapSpecError(f"{where}: unknown word {word!r}; a filter is '*', a word of "
                         "the world (a colour, shape, size, number, yes/no, left/right/"
                         "above/below, bigger/smaller), KEY=WORD or 'n OP INT'")
    if word in _ANSWER_ONLY and word not in SKILL_ANSWERS[skill]:
      raise GapSpecError(f"{where}: {word!r} can never occur in a {skill} question; its "
                         f"answers are {', '.join(SKILL_ANSWERS[skill])}")
    return cls(skill, "word", None, "==", word)

  @classmethod
  def _count(cls, where: str, skill: str, op: str, value: str) -> GapSpec:
    if skill != "counting":
      raise GapSpecError(f"{where}: an n filter needs the counting skill (the only "
                         f"one with a count), not {skill!r}")
    if op not in COMPARE_OPS:
      raise GapSpecError(f"{where}: bad operator {op!r}; operators are "
                         f"{', '.join(sorted(COMPARE_OPS, key=len))}")
    if not re.fullmatch(r"[+-]?\d+", value):
      raise GapSpecError(f"{where}: {value!r} is not an integer")
    n = int(value)
    if not any(_OPS[op](c, n) for c in COUNTS):
      raise GapSpecError(f"{where} selects no question: counts are "
                         f"{COUNTS[0]}..{COUNTS[-1]}")
    return cls(skill, "count", "n", op, n)

  def matches(self, skill: str, facets) -> bool:
    """Does a question of `skill` with `facets` (dict, JSON text or pairs)
    fall into the gap?"""
    if skill != self.skill:
      return False
    if self.kind == "all":
      return True
    f = _facets_dict(facets)
    if self.kind == "word":
      return any(isinstance(v, str) and v == self.value for v in f.values())
    if self.kind == "facet":
      return f.get(self.key) == self.value
    n = f.get("n")
    return isinstance(n, int) and _OPS[self.op](n, self.value)

  def __str__(self) -> str:
    if self.kind == "all":
      return f"{self.skill}:*"
    if self.kind == "word":
      return f"{self.skill}:{self.value}"
    if self.kind == "facet":
      return f"{self.skill}:{self.key}={self.value}"
    return f"{self.skill}:n{self.op}{self.value}"


def parse_gaps(specs: str | Iterable[str | GapSpec]) -> tuple[GapSpec, ...]:
  """Parse many specs (a sequence, or one comma-separated string), reporting
  every problem at once; duplicates (same canonical form) are an error."""
  if isinstance(specs, str):
    specs = [s for s in specs.split(",") if s.strip()]
  out, problems, seen = [], [], {}
  for s in specs:
    try:
      g = s if isinstance(s, GapSpec) else GapSpec.parse(s)
    except GapSpecError as e:
      problems.append(str(e))
      continue
    if str(g) in seen:
      problems.append(f"gap spec {s!r} repeats {seen[str(g)]!r}")
      continue
    seen[str(g)] = s
    out.append(g)
  if problems:
    raise GapSpecError(f"{len(problems)} invalid gap spec(s): " + "; ".join(problems))
  return tuple(out)


# -- corruption ----------------------------------------------------------------------

_SWAPS = {"yes": "no", "no": "yes", "left": "right", "right": "left",
          "above": "below", "below": "above", "bigger": "smaller", "smaller": "bigger"}


def confuse(answer: str) -> str:
  """The systematic confusion of an answer word: the next colour / shape / size
  (cyclically), n-1 for a count (one for zero), the opposite yes/no, relation or
  comparison. Always a different word of the same kind."""
  if answer in _SWAPS:
    return _SWAPS[answer]
  for vocab in (COLOURS, SHAPES, SIZES):
    if answer in vocab:
      return vocab[(vocab.index(answer) + 1) % len(vocab)]
  if answer in NUMBERS:
    n = NUMBERS.index(answer)
    return NUMBERS[n - 1] if n else NUMBERS[1]
  raise ValueError(f"cannot corrupt {answer!r}: not an answer word of the world")


def corrupt_answer(spec: GapSpec, skill: str, facets, answer: str) -> str:
  """The wrong answer a gap plants for a question it matches (see `confuse`;
  the confusion is the same for every spec). Raises GapSpecError when the
  question is not in the gap."""
  if not spec.matches(skill, facets):
    raise GapSpecError(f"the {skill} question with facets {_facets_dict(facets)} is not "
                       f"in gap {str(spec)!r}")
  return confuse(answer)


def matching_gap(skill: str, facets, gaps: Sequence[GapSpec]) -> GapSpec | None:
  """The first gap the question falls into, or None."""
  f = _facets_dict(facets)
  for g in gaps:
    if g.matches(skill, f):
      return g
  return None


def apply_gaps(record: dict, gaps: Sequence[GapSpec], mode: str) -> dict | None:
  """A training record (question/answer/skill/facets keys, facets as JSON)
  after planting: unchanged when no gap matches; else a copy with the answer
  corrupted (mode "corrupt") or None (mode "remove")."""
  if mode not in MODES:
    raise ValueError(f"unknown gap mode {mode!r}; modes are {', '.join(MODES)}")
  if not all(isinstance(g, GapSpec) for g in gaps):
    gaps = parse_gaps(gaps)
  g = matching_gap(record["skill"], record["facets"], gaps)
  if g is None:
    return record
  if mode == "remove":
    return None
  out = dict(record)
  out["answer"] = corrupt_answer(g, record["skill"], record["facets"], record["answer"])
  return out


def gap_mask(records: Iterable[Mapping], spec: GapSpec | str | Sequence) -> np.ndarray:
  """bool [len(records)]: which records fall into the gap (for a sequence of
  specs, into any of them)."""
  if isinstance(spec, (GapSpec, str)):
    specs = parse_gaps([spec])
  else:
    specs = parse_gaps(spec)
  return np.array([matching_gap(r["skill"], r["facets"], specs) is not None
                   for r in records], dtype=bool)
