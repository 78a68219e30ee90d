"""The edit command language: one-object edits of a scene, written as text.

Commands (lowercase, words separated by single spaces, optional trailing "."):

  recolour the REF to COLOUR
  reshape the REF into a SHAPE
  resize the REF to SIZE
  move the REF to the ROW COL             ROW: top/middle/bottom, COL: left/centre/right
  add a SIZE COLOUR SHAPE at the ROW COL  ("an" is accepted for "a")
  remove the REF

REF is a noun phrase `[SIZE] [COLOUR] (SHAPE|object)` naming at least one
attribute ("object" stands in for a missing shape: "red object", "small
object"); applied to a scene it must match exactly one object.

Parsing is forgiving about case and runs of whitespace (a model's output is
lowercased and split on whitespace) but nothing else: every word must be in
its place. `parse_edit` checks the text alone, `apply_edit` checks it against
a scene; both raise `EditError` naming the text and the problem, and
`try_edit` is their non-raising form for reward code.

The noun-phrase and cell helpers here (`parse_ref`, `ref_text`, `the_one`,
`parse_cell`, `cell_text`, `words_of`) are shared with the caption and
question parsers.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from auditdm_jax.scenes.world import (
  COL_NAMES,
  COLOURS,
  GRID,
  MAX_OBJECTS,
  ROW_NAMES,
  SHAPES,
  SIZES,
  Obj,
  Scene,
)

OPS = ("recolour", "reshape", "resize", "move", "add", "remove")
# The visual factor each op changes (`changed_factor`).
FACTORS = {"recolour": "colour", "reshape": "shape", "resize": "size",
           "move": "position", "add": "presence", "remove": "presence"}
ARTICLES = ("a", "an")


class EditError(ValueError):
  """A malformed edit command, or one impossible in the given scene."""


# -- shared grammar helpers ----------------------------------------------------------

def words_of(text: str, end: str = ".") -> list[str]:
  """Lowercased words of `text` without one trailing `end` mark."""
  if not isinstance(text, str):
    raise TypeError(f"expected text, got {type(text).__name__}")
  t = text.strip().lower()
  if end and t.endswith(end):
    t = t[:-len(end)]
  return t.split()


def parse_ref(words: Sequence[str], plural: bool = False) -> dict[str, str | None]:
  """`[SIZE] [COLOUR] (SHAPE|object)` -> {"size", "colour", "shape"} (None =
  any). A singular phrase must name at least one attribute ("object" alone
  is refused); with `plural` the head is "SHAPEs" or "objects", and "objects"
  alone means every object. Raises ValueError naming the problem."""
  words = list(words)
  phrase = " ".join(words)
  if not words:
    raise ValueError("missing noun phrase")
  if len(words) > 3:
    raise ValueError(f"noun phrase {phrase!r} has {len(words)} words; it is "
                     "[size] [colour] (shape|object)")
  head, mods = words[-1], words[:-1]
  shapes = {s + "s": s for s in SHAPES} if plural else {s: s for s in SHAPES}
  generic = "objects" if plural else "object"
  if head == generic:
    shape = None
  elif head in shapes:
    shape = shapes[head]
  else:
    expected = f"a shape ({', '.join(shapes)}) or {generic!r}"
    raise ValueError(f"noun phrase {phrase!r} must end in {expected}, not {head!r}")
  size = colour = None
  for i, w in enumerate(mods):
    if w in SIZES:
      if size is not None:
        raise ValueError(f"noun phrase {phrase!r} names two sizes")
      if i != 0:
        raise ValueError(f"noun phrase {phrase!r}: the size {w!r} must come first")
      size = w
    elif w in COLOURS:
      if colour is not None:
        raise ValueError(f"noun phrase {phrase!r} names two colours")
      colour = w
    elif w in SHAPES or w in (s + "s" for s in SHAPES) or w in ("object", "objects"):
      raise ValueError(f"noun phrase {phrase!r}: {w!r} can only be the last word")
    else:
      raise ValueError(f"noun phrase {phrase!r}: unknown word {w!r} (sizes are "
                       f"{', '.join(SIZES)}; colours are {', '.join(COLOURS)})")
  if size is None and colour is None and shape is None and not plural:
    raise ValueError(f"noun phrase {phrase!r} names no size, colour or shape")
  return {"size": size, "colour": colour, "shape": shape}


def ref_text(size: str | None = None, colour: str | None = None,
             shape: str | None = None, plural: bool = False) -> str:
  words = [w for w in (size, colour) if w]
  if plural:
    words.append(shape + "s" if shape else "objects")
  else:
    words.append(shape if shape else "object")
  return " ".join(words)


def the_one(scene: Scene, ref: dict[str, str | None], what: str,
            error: type[ValueError] = ValueError) -> Obj:
  """The one object of `scene` that the noun phrase `ref` (`parse_ref`) names;
  `error` ("{what}: ...", `what` naming the text) when none or several do."""
  found = scene.select(**ref)
  name = ref_text(**ref)
  if not found:
    raise error(f"{what}: no object in the scene is a {name}")
  if len(found) > 1:
    raise error(f"{what}: 'the {name}' is ambiguous, {len(found)} objects match it")
  return found[0]


def parse_cell(row_word: str, col_word: str) -> tuple[int, int]:
  if row_word not in ROW_NAMES:
    raise ValueError(f"unknown row {row_word!r}; rows are {', '.join(ROW_NAMES)}")
  if col_word not in COL_NAMES:
    raise ValueError(f"unknown column {col_word!r}; columns are {', '.join(COL_NAMES)}")
  return ROW_NAMES.index(row_word), COL_NAMES.index(col_word)


def cell_text(row: int, col: int) -> str:
  """"top left" .. "bottom right" (the same as text.cell_name)."""
  return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


def _word(kind: str, w: str) -> str:
  vocab = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[kind]
  if w not in vocab:
    raise ValueError(f"unknown {kind} {w!r}; {kind}s are {', '.join(vocab)}")
  return w


# -- the edit ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Edit:
  """One parsed command.

  op: one of OPS. size/colour/shape: the REF's attributes (None = not named;
  all None for "add"). arg: the new colour / shape / size word for recolour /
  reshape / resize, the target (row, col) for move, the new `Obj` for add,
  None for remove.
  """

  op: str
  size: str | None = None
  colour: str | None = None
  shape: str | None = None
  arg: object = None

  def __post_init__(self):
    if self.op not in OPS:
      raise EditError(f"unknown edit op {self.op!r}; ops are {', '.join(OPS)}")
    ref = (self.size, self.colour, self.shape)
    if self.op == "add":
      if any(ref):
        raise EditError("an add edit has no reference object")
      if not isinstance(self.arg, Obj):
        raise EditError(f"an add edit needs an Obj argument, not {self.arg!r}")
      return
    try:
      if self.size is not None:
        _word("size", self.size)
      if self.colour is not None:
        _word("colour", self.colour)
      if self.shape is not None:
        _word("shape", self.shape)
      if not any(ref):
        raise ValueError("the reference names no size, colour or shape")
      if self.op in ("recolour", "reshape", "resize"):
        _word(FACTORS[self.op], self.arg)
      elif self.op == "move":
        r, c = self.arg
        if not (0 <= r < GRID and 0 <= c < GRID):
          raise ValueError(f"cell {self.arg!r} is outside the grid")
      elif self.arg is not None:
        raise ValueError(f"a remove edit takes no argument, not {self.arg!r}")
    except (ValueError, TypeError) as e:
      raise EditError(f"invalid {self.op} edit: {e}") from None

  @property
  def ref(self) -> dict[str, str | None]:
    return {"size": self.size, "colour": self.colour, "shape": self.shape}

  @property
  def factor(self) -> str:
    return FACTORS[self.op]

  def __str__(self) -> str:
    return edit_text(self)


# Each op's words around the REF: (words before it, words after it). Slots in
# capitals are filled from the vocabulary; "ART" is "a" or "an".
_FORMS = {
    "recolour": (("the",), ("to", "COLOUR")),
    "reshape": (("the",), ("into", "ART", "SHAPE")),
    "resize": (("the",), ("to", "SIZE")),
    "move": (("the",), ("to", "the", "ROW", "COL")),
    "remove": (("the",), ()),
}
_ADD_FORM = ("ART", "SIZE", "COLOUR", "SHAPE", "at", "the", "ROW", "COL")
_SYNTAX = {
    "recolour": "recolour the REF to COLOUR",
    "reshape": "reshape the REF into a SHAPE",
    "resize": "resize the REF to SIZE",
    "move": "move the REF to the ROW COL",
    "add": "add a SIZE COLOUR SHAPE at the ROW COL",
    "remove": "remove the REF",
}


def _fill(slots: Sequence[str], words: Sequence[str]) -> dict[str, str]:
  """Match fixed words and slots one to one; returns the slot values."""
  out = {}
  for slot, w in zip(slots, words):
    if slot == "ART":
      if w not in ARTICLES:
        raise ValueError(f"expected 'a' or 'an', got {w!r}")
    elif slot in ("COLOUR", "SHAPE", "SIZE"):
      out[slot] = _word(slot.lower(), w)
    elif slot in ("ROW", "COL"):
      out[slot] = w
    elif w != slot:
      raise ValueError(f"expected {slot!r}, got {w!r}")
  return out


def parse_edit(text: str) -> Edit:
  """Parse one command (see the module docstring); raises EditError."""
  if isinstance(text, Edit):
    return text
  words = words_of(text, ".")
  if not words:
    raise EditError(f"empty edit command {text!r}")
  op = words[0]
  if op not in OPS:
    raise EditError(f"edit {text!r}: unknown command {op!r}; commands start with "
                    f"one of {', '.join(OPS)}")
  rest = words[1:]
  try:
    if op == "add":
      if len(rest) != len(_ADD_FORM):
        raise ValueError(f"expected {len(_ADD_FORM) + 1} words, got {len(words)}")
      slots = _fill(_ADD_FORM, rest)
      r, c = parse_cell(slots["ROW"], slots["COL"])
      return Edit("add", arg=Obj(r, c, slots["SHAPE"], slots["COLOUR"], slots["SIZE"]))
    before, after = _FORMS[op]
    n_ref = len(rest) - len(before) - len(after)
    if n_ref < 1:
      raise ValueError(f"too short ({len(words)} words)")
    slots = _fill(before, rest[:len(before)])
    slots.update(_fill(after, rest[len(rest) - len(after):]))
    ref = parse_ref(rest[len(before):len(before) + n_ref])
    if op == "recolour":
      arg = slots["COLOUR"]
    elif op == "reshape":
      arg = slots["SHAPE"]
    elif op == "resize":
      arg = slots["SIZE"]
    elif op == "move":
      arg = parse_cell(slots["ROW"], slots["COL"])
    else:
      arg = None
    return Edit(op, arg=arg, **ref)
  except (ValueError, TypeError) as e:
    if isinstance(e, EditError):
      raise
    raise EditError(f"edit {text!r}: {e} (the form is {_SYNTAX[op]!r})") from None


def edit_text(edit: Edit) -> str:
  """The canonical command of `edit` (no trailing "."): parse_edit inverts it."""
  if edit.op == "add":
    o = edit.arg
    return f"add a {o.describe()} at the {cell_text(o.row, o.col)}"
  ref = ref_text(edit.size, edit.colour, edit.shape)
  if edit.op == "recolour":
    return f"recolour the {ref} to {edit.arg}"
  if edit.op == "reshape":
    return f"reshape the {ref} into a {edit.arg}"
  if edit.op == "resize":
    return f"resize the {ref} to {edit.arg}"
  if edit.op == "move":
    return f"move the {ref} to the {cell_text(*edit.arg)}"
  return f"remove the {ref}"


def apply_edit(scene: Scene, edit: str | Edit) -> Scene:
  """The scene after the edit; raises EditError for malformed text and for
  impossible edits (the ref matches no object or several, the target cell is
  occupied, the scene is full, the edit changes nothing, the last object is
  removed)."""
  e = parse_edit(edit)
  text = edit if isinstance(edit, str) else edit_text(e)
  if e.op == "add":
    o = e.arg
    if len(scene) >= MAX_OBJECTS:
      raise EditError(f"edit {text!r}: the scene is full ({MAX_OBJECTS} objects)")
    there = scene.at(o.row, o.col)
    if there is not None:
      raise EditError(f"edit {text!r}: the {cell_text(o.row, o.col)} cell is occupied "
                      f"by the {there.describe()}")
    return scene.replace_object(None, o)
  obj = the_one(scene, e.ref, f"edit {text!r}", EditError)
  if e.op == "remove":
    if len(scene) == 1:
      raise EditError(f"edit {text!r}: cannot remove the last object")
    return scene.replace_object(obj, None)
  if e.op == "move":
    r, c = e.arg
    if (r, c) == obj.cell:
      raise EditError(f"edit {text!r} changes nothing: the object is already at the "
                      f"{cell_text(r, c)}")
    there = scene.at(r, c)
    if there is not None:
      raise EditError(f"edit {text!r}: the {cell_text(r, c)} cell is occupied by the "
                      f"{there.describe()}")
    return scene.replace_object(obj, dataclasses.replace(obj, row=r, col=c))
  factor = FACTORS[e.op]
  if getattr(obj, factor) == e.arg:
    raise EditError(f"edit {text!r} changes nothing: the object is already {e.arg}")
  return scene.replace_object(obj, dataclasses.replace(obj, **{factor: e.arg}))


def try_edit(scene: Scene, text: str | Edit) -> tuple[Scene | None, str]:
  """(edited scene, "") or (None, the reason the edit is invalid)."""
  try:
    return apply_edit(scene, text), ""
  except EditError as e:
    return None, str(e)


def changed_factor(before: Scene, after: Scene, edit: str | Edit) -> str:
  """The visual factor the edit changed: colour, shape, size, position or
  presence. Raises EditError when `edit` does not turn `before` into `after`."""
  e = parse_edit(edit)
  if apply_edit(before, e) != after:
    raise EditError(f"edit {edit_text(e)!r} does not turn {before.to_json()} into "
                    f"{after.to_json()}")
  return FACTORS[e.op]


# -- sampling ------------------------------------------------------------------------

_REF_ATTRS = [attrs for k in (1, 2, 3)
              for attrs in itertools.combinations(("size", "colour", "shape"), k)]


def unique_refs(scene: Scene, obj: Obj) -> list[dict[str, str | None]]:
  """Every reference (attribute subset) that names `obj` alone in `scene`."""
  out = []
  for attrs in _REF_ATTRS:
    ref = {a: getattr(obj, a) for a in attrs}
    if len(scene.select(**ref)) == 1:
      out.append({a: ref.get(a) for a in ("size", "colour", "shape")})
  return out


def possible_ops(scene: Scene) -> tuple[str, ...]:
  """The ops with at least one valid command in `scene`."""
  referable = any(unique_refs(scene, o) for o in scene.objects)
  ok = {"recolour": referable, "reshape": referable, "resize": referable,
        "move": referable and bool(scene.free_cells()),
        "add": len(scene) < MAX_OBJECTS,
        "remove": referable and len(scene) > 1}
  return tuple(op for op in OPS if ok[op])


def random_edit(scene: Scene, rng: np.random.Generator) -> str:
  """A valid command for `scene`: op uniform over the possible ones, then the
  object, its reference (any unique one) and the argument uniform."""
  ops = possible_ops(scene)
  if not ops:
    raise EditError(f"no edit is possible in scene {scene.to_json()}")
  op = ops[rng.integers(len(ops))]
  free = scene.free_cells()
  if op == "add":
    r, c = free[rng.integers(len(free))]
    o = Obj(r, c, SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))],
            SIZES[rng.integers(len(SIZES))])
    return edit_text(Edit("add", arg=o))
  objs = [o for o in scene.objects if unique_refs(scene, o)]
  obj = objs[rng.integers(len(objs))]
  refs = unique_refs(scene, obj)
  ref = refs[rng.integers(len(refs))]
  if op == "move":
    arg = free[rng.integers(len(free))]
  elif op == "remove":
    arg = None
  else:
    factor = FACTORS[op]
    vocab = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[factor]
    options = [v for v in vocab if v != getattr(obj, factor)]
    arg = options[rng.integers(len(options))]
  return edit_text(Edit(op, arg=arg, **ref))
