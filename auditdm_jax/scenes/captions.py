"""The caption language: a complete description of a scene, one clause per object.

  CAPTION = CLAUSE (" and " CLAUSE)*  ["."]        1 to 8 clauses
  CLAUSE  = "a SIZE COLOUR SHAPE at the ROW COL"   ("an" is accepted for "a")

e.g. "a small red circle at the top left and a large blue square at the middle
centre". `caption(scene)` writes the clauses in Scene order (by cell) and
`parse_caption` reads them in any order, so parse_caption(caption(s)) == s.
Parsing is forgiving about case and runs of whitespace only; everything else
that is wrong raises `CaptionError` naming the clause and the problem.
"""

from __future__ import annotations

from auditdm_jax.scenes.edits import ARTICLES, cell_text, parse_cell, words_of
from auditdm_jax.scenes.world import COLOURS, MAX_OBJECTS, SHAPES, SIZES, Obj, Scene

CLAUSE_FORM = "a SIZE COLOUR SHAPE at the ROW COL"


class CaptionError(ValueError):
  """A caption that does not describe a valid scene."""


def clause(obj: Obj) -> str:
  return f"a {obj.describe()} at the {cell_text(obj.row, obj.col)}"


def caption(scene: Scene) -> str:
  """The scene's caption (no trailing "."); parse_caption inverts it."""
  if not len(scene):
    raise CaptionError("an empty scene has no caption")
  return " and ".join(clause(o) for o in scene.objects)


def _parse_clause(words: list[str]) -> Obj:
  if len(words) != 8:
    raise ValueError(f"{len(words)} words, a clause has 8 ({CLAUSE_FORM!r})")
  art, size, colour, shape, at, the, row, col = words
  if art not in ARTICLES:
    raise ValueError(f"a clause starts with 'a', not {art!r}")
  for kind, w, vocab in (("size", size, SIZES), ("colour", colour, COLOURS),
                         ("shape", shape, SHAPES)):
    if w not in vocab:
      raise ValueError(f"unknown {kind} {w!r}; {kind}s are {', '.join(vocab)} "
                       f"(the form is {CLAUSE_FORM!r})")
  if (at, the) != ("at", "the"):
    raise ValueError(f"expected 'at the' after the shape, got {at + ' ' + the!r}")
  r, c = parse_cell(row, col)
  return Obj(r, c, shape, colour, size)


def parse_caption(text: str) -> Scene:
  """The scene a caption describes; raises CaptionError."""
  words = words_of(text, ".")
  if not words:
    raise CaptionError(f"empty caption {text!r}")
  clauses, cur = [], []
  for w in words:
    if w == "and":
      clauses.append(cur)
      cur = []
    else:
      cur.append(w)
  clauses.append(cur)
  if len(clauses) > MAX_OBJECTS:
    raise CaptionError(f"caption {text!r}: {len(clauses)} clauses, a scene has at "
                       f"most {MAX_OBJECTS} objects")
  objs, seen = [], {}
  for i, ws in enumerate(clauses, 1):
    if not ws:
      raise CaptionError(f"caption {text!r}: clause {i} is empty (a stray 'and')")
    try:
      o = _parse_clause(ws)
    except ValueError as e:
      raise CaptionError(f"caption {text!r}: clause {i} {' '.join(ws)!r}: {e}") from None
    if o.cell in seen:
      raise CaptionError(f"caption {text!r}: clauses {seen[o.cell]} and {i} both put an "
                         f"object at the {cell_text(o.row, o.col)}")
    seen[o.cell] = i
    objs.append(o)
  return Scene(tuple(objs))


def try_caption(text: str) -> tuple[Scene | None, str]:
  """(scene, "") or (None, the reason the caption is invalid)."""
  try:
    return parse_caption(text), ""
  except CaptionError as e:
    return None, str(e)
