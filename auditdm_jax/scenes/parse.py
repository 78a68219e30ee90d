"""Free questions answered against a scene: the inverse of the templates.

`answer_question(scene, text)` recognises every wording of questions.py with
any noun phrase REF = `[SIZE] [COLOUR] (SHAPE|object)` (not only the shortest
unique one the templates pick), and returns the `Question` the template would
have produced: the exact answer, the skill label and the facets.

  what colour is the REF?                    colour        (answer: a colour)
  what shape is the small COLOUR object?     small_object  (exactly this form)
  what shape is the REF?                     shape         (any other REF)
  what size is the REF?                      binding
  how many [SIZE] [COLOUR] (SHAPEs|objects) are there?   counting
  is there a/an REF?                         existence
  is the REF left or right of the REF?       spatial
  is the REF above or below the REF?         spatial
  is the REF bigger or smaller than the REF? size

Facets follow the templates: (answer, colour, shape, size) of the subject
object for the object questions; (answer, n) plus the named attributes
(colour, shape, size, in that order) for counting; (answer) plus the named
attributes for existence. A REF that must name one object (every REF except
those of counting and existence) raises QuestionError when it matches no
object or several; so do unrecognised wordings and ill-posed questions (left
or right of two objects in one column, above or below two in one row, bigger
or smaller of two equal sizes, a relation of an object to itself). Parsing is
forgiving about case, runs of whitespace and a missing "?".

`strict=True` accepts only the templates' own language, the questions the
world's models were trained on: the canonical text (lowercase, single
spaces, a final "?") and the noun-phrase forms each template writes:

  what colour is the [SIZE] SHAPE?            what size is the COLOUR SHAPE?
  what shape is the COLOUR object?            what shape is the small COLOUR object?
  how many (objects|COLOUR objects|SHAPEs) are there?
  is there a/an COLOUR SHAPE?
  relations: SHAPE | COLOUR object | COLOUR SHAPE | SIZE SHAPE | SIZE COLOUR SHAPE

A question outside it ("is there a red object?", "is there a red circle"
without the "?") is well defined in the world but unlike anything a model
saw, so no model's answer to it, the references' included, can be trusted;
the audit's question check is strict (scenes/editor.py).
"""

from __future__ import annotations

from auditdm_jax.scenes.edits import ARTICLES, parse_ref, ref_text, the_one, words_of
from auditdm_jax.scenes.questions import NUMBERS, SIZE_RANK, Question, article
from auditdm_jax.scenes.world import Obj, Scene

# "is the A <relation> the B?": relation words -> (skill, answer if A is first/bigger,
# answer otherwise, the attribute compared).
_RELATIONS = {
    ("left", "or", "right", "of", "the"): ("spatial", "left", "right", "col"),
    ("above", "or", "below", "the"): ("spatial", "above", "below", "row"),
    ("bigger", "or", "smaller", "than", "the"): ("size", "bigger", "smaller", "size"),
}
_ILL_POSED = {"col": "are in the same column", "row": "are in the same row",
              "size": "have the same size"}


class QuestionError(ValueError):
  """A question that is not in the world's language or has no single answer."""


def _ref(words, text, plural=False) -> dict:
  try:
    return parse_ref(words, plural=plural)
  except ValueError as e:
    raise QuestionError(f"question {text!r}: {e}") from None


def _one(scene: Scene, ref: dict, text: str) -> Obj:
  return the_one(scene, ref, f"question {text!r}", QuestionError)


def _object_facets(answer: str, o: Obj) -> tuple:
  return (("answer", answer), ("colour", o.colour), ("shape", o.shape),
          ("size", o.size))


def _named(ref: dict) -> tuple:
  return tuple((k, ref[k]) for k in ("colour", "shape", "size") if ref[k] is not None)


# The noun-phrase forms (the attributes named) each template writes.
_RELATION_FORMS = frozenset({("shape",), ("colour",), ("colour", "shape"), ("size", "shape"),
                             ("size", "colour", "shape")})
_TEMPLATE_FORMS = {
    "what colour": frozenset({("shape",), ("size", "shape")}),
    "what shape": frozenset({("colour",), ("size", "colour")}),
    "what size": frozenset({("colour", "shape")}),
    "how many": frozenset({(), ("colour",), ("shape",)}),
    "is there": frozenset({("colour", "shape")}),
    "relation": _RELATION_FORMS,
}


def _form(ref: dict) -> tuple:
  return tuple(k for k in ("size", "colour", "shape") if ref[k] is not None)


def _check_form(kind: str, ref: dict, text: str) -> None:
  form = _form(ref)
  if form not in _TEMPLATE_FORMS[kind] or (
      kind == "what shape" and "size" in form and ref["size"] != "small"):
    allowed = sorted(" ".join(f) or "(no attribute)" for f in _TEMPLATE_FORMS[kind])
    raise QuestionError(
        f"question {text!r}: the noun phrase {ref_text(**ref)!r} names "
        f"{' + '.join(form) or 'no attribute'}; the world's {kind!r} questions name "
        f"{' | '.join(allowed)} (strict: only the templates' language)")


def _find(words: list[str], seq: tuple[str, ...]) -> int:
  for i in range(len(words) - len(seq) + 1):
    if tuple(words[i:i + len(seq)]) == seq:
      return i
  return -1


def _what(scene: Scene, words: list[str], text: str, canon: str, check) -> Question:
  """what colour / shape / size is the REF?"""
  if words[3] != "the":
    raise QuestionError(f"question {text!r}: expected 'the' after "
                        f"{' '.join(words[:3])!r}, got {words[3]!r}")
  attr = words[1]
  ref = _ref(words[4:], text)
  check(f"what {attr}", ref, text)
  o = _one(scene, ref, text)
  answer = getattr(o, attr)
  if attr == "colour":
    skill = "colour"
  elif attr == "size":
    skill = "binding"
  elif ref["size"] == "small" and ref["colour"] and ref["shape"] is None:
    skill = "small_object"
  else:
    skill = "shape"
  return Question(canon, answer, skill, _object_facets(answer, o))


def _how_many(scene: Scene, words: list[str], text: str, canon: str, check) -> Question:
  if words[-2:] != ["are", "there"] or len(words) < 5:
    raise QuestionError(f"question {text!r}: the form is 'how many [SIZE] [COLOUR] "
                        "(SHAPEs|objects) are there?'")
  ref = _ref(words[2:-2], text, plural=True)
  check("how many", ref, text)
  n = len(scene.select(**ref))
  return Question(canon, NUMBERS[n], "counting",
                  (("answer", NUMBERS[n]), ("n", n)) + _named(ref))


def _is_there(scene: Scene, words: list[str], text: str, canon: str, check,
              strict: bool) -> Question:
  if len(words) < 4 or words[2] not in ARTICLES:
    raise QuestionError(f"question {text!r}: the form is 'is there a REF?'")
  ref = _ref(words[3:], text)
  check("is there", ref, text)
  if strict and words[2] != article(words[3]):
    raise QuestionError(f"question {text!r}: the templates write "
                        f"'{article(words[3])} {words[3]}'")
  answer = "yes" if scene.select(**ref) else "no"
  return Question(canon, answer, "existence", (("answer", answer),) + _named(ref))


def _relation(scene: Scene, words: list[str], text: str, canon: str, check) -> Question:
  """is the REF <left or right of | above or below | bigger or smaller than> the REF?"""
  for seq, (skill, first, second, attr) in _RELATIONS.items():
    i = _find(words, seq)
    if i < 0:
      continue
    ref_a, ref_b = _ref(words[2:i], text), _ref(words[i + len(seq):], text)
    check("relation", ref_a, text)
    check("relation", ref_b, text)
    a, b = _one(scene, ref_a, text), _one(scene, ref_b, text)
    if a == b:
      raise QuestionError(f"question {text!r} relates an object to itself")
    if attr == "size":
      va, vb = SIZE_RANK[a.size], SIZE_RANK[b.size]
      va, vb = -va, -vb   # "bigger" comes first: bigger rank = first answer
    else:
      va, vb = getattr(a, attr), getattr(b, attr)
    if va == vb:
      raise QuestionError(f"question {text!r} is ill-posed: the two objects "
                          f"{_ILL_POSED[attr]}")
    answer = first if va < vb else second
    return Question(canon, answer, skill, _object_facets(answer, a))
  raise QuestionError(f"question {text!r}: expected 'left or right of the', 'above "
                      "or below the' or 'bigger or smaller than the' after the first "
                      "object")


def answer_question(scene: Scene, text: str, strict: bool = False) -> Question:
  """The Question (exact answer, skill, facets) of free `text` about `scene`;
  `strict`: only the templates' language (module doc)."""
  words = words_of(text, "?")
  if not words:
    raise QuestionError(f"empty question {text!r}")
  canon = " ".join(words) + "?"
  if strict and text != canon:
    raise QuestionError(f"question {text!r} is not in the templates' canonical form "
                        f"{canon!r} (lowercase, single spaces, a final '?')")
  check = _check_form if strict else (lambda kind, ref, text: None)
  if tuple(words[:3]) in (("what", "colour", "is"), ("what", "shape", "is"),
                          ("what", "size", "is")) and len(words) > 3:
    return _what(scene, words, text, canon, check)
  if words[:2] == ["how", "many"]:
    return _how_many(scene, words, text, canon, check)
  if words[:2] == ["is", "there"]:
    return _is_there(scene, words, text, canon, check, strict)
  if words[:2] == ["is", "the"]:
    return _relation(scene, words, text, canon, check)
  raise QuestionError(f"question {text!r} is not a question of the world; questions "
                      "start with 'what colour/shape/size is the', 'how many', 'is "
                      "there a' or 'is the'")


def try_answer(scene: Scene, text: str, strict: bool = False
               ) -> tuple[Question | None, str]:
  """(Question, "") or (None, the reason the question cannot be answered)."""
  try:
    return answer_question(scene, text, strict), ""
  except QuestionError as e:
    return None, str(e)


def subject_attributes(text: str) -> dict[str, str]:
  """The attributes a question names of its subject (the first noun phrase),
  from the text alone, no scene: "what shape is the green object?" ->
  {"colour": "green"}; "how many red objects are there?" -> {"colour": "red"};
  {} for a question outside the world's wordings. What mining may group by
  besides the answer (the question's own words, not the truth)."""
  try:
    words = words_of(text, "?")
  except TypeError:
    return {}
  ref = None
  try:
    if len(words) > 4 and words[0] == "what" and words[1] in ("colour", "shape", "size") \
        and words[2:4] == ["is", "the"]:
      ref = parse_ref(words[4:])
    elif words[:2] == ["how", "many"] and words[-2:] == ["are", "there"]:
      ref = parse_ref(words[2:-2], plural=True)
    elif words[:2] == ["is", "there"] and len(words) > 3:
      ref = parse_ref(words[3:])
    elif words[:2] == ["is", "the"]:
      for seq in _RELATIONS:
        i = _find(words, seq)
        if i >= 0:
          ref = parse_ref(words[2:i])
          break
  except ValueError:
    return {}
  return {} if ref is None else {k: v for k, v in ref.items() if v is not None}

