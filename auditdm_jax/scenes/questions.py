"""Questions over eight skills, with exact short answers and skill labels.

Every question is generated from a template whose wording makes the answer a
single word, and carries `facets`: the attributes it is about (its answer,
the subject's colour / shape / size, and `n` for counting). Gap specs
(`gaps.py`) select slices of the question distribution through these facets.

Skills (the names used everywhere: eval, gap specs, reports):
  colour        what colour is the <ref>?               -> a colour
  shape         what shape is the <colour> object?      -> a shape
  counting      how many <things> are there?            -> zero..eight
  existence     is there a <colour> <shape>?            -> yes / no
  spatial       is the A left or right of the B?        -> left / right
                is the A above or below the B?          -> above / below
  size          is the A bigger or smaller than the B?  -> bigger / smaller
  binding       what size is the <colour> <shape>?      -> small / medium / large
                (both the colour and the shape also occur on other objects)
  small_object  what shape is the small <colour> object? -> a shape
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from auditdm_jax.scenes.world import (
  COLOURS,
  GRID,
  MAX_OBJECTS,
  SHAPES,
  SIZES,
  Obj,
  Scene,
)

SKILLS = ("colour", "shape", "counting", "existence", "spatial", "size",
          "binding", "small_object")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
           "nine")
YES_NO = ("yes", "no")
RELATIONS = ("left", "right", "above", "below")
COMPARISONS = ("bigger", "smaller")
ANSWER_WORDS = COLOURS + SHAPES + SIZES + NUMBERS + YES_NO + RELATIONS + COMPARISONS
SIZE_RANK = {s: i for i, s in enumerate(SIZES)}


@dataclasses.dataclass(frozen=True)
class Question:
  text: str
  answer: str
  skill: str
  facets: tuple[tuple[str, object], ...] = ()

  def facet(self, key, default=None):
    return dict(self.facets).get(key, default)


def article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
  return shape + "s"


def unique_ref(scene: Scene, obj: Obj, avoid: tuple[str, ...] = ()) -> str | None:
  """The shortest noun phrase naming `obj` uniquely, without the attributes
  in `avoid` (e.g. a colour question must not name the colour)."""
  options = []
  if "shape" not in avoid:
    options.append(("shape",))
  if "colour" not in avoid:
    options.append(("colour",))
  if "shape" not in avoid and "colour" not in avoid:
    options.append(("colour", "shape"))
  if "size" not in avoid and "shape" not in avoid:
    options.append(("size", "shape"))
  if "size" not in avoid and "colour" not in avoid and "shape" not in avoid:
    options.append(("size", "colour", "shape"))
  for attrs in options:
    match = scene.select(**{a: getattr(obj, a) for a in attrs})
    if len(match) == 1:
      return phrase(**{a: getattr(obj, a) for a in attrs})
  return None


def phrase(size=None, colour=None, shape=None) -> str:
  words = [w for w in (size, colour) if w]
  words.append(shape if shape else "object")
  return " ".join(words)


# -- templates: each returns a Question or None when the scene does not allow one --

def _q_attribute(scene, rng, attr: str):
  """"what ATTR is the REF?" with a REF that does not name ATTR."""
  objs = list(scene.objects)
  rng.shuffle(objs)
  for o in objs:
    ref = unique_ref(scene, o, avoid=(attr,))
    if ref:
      value = getattr(o, attr)
      return Question(f"what {attr} is the {ref}?", value, attr,
                      (("answer", value), ("colour", o.colour), ("shape", o.shape),
                       ("size", o.size)))
  return None


def q_colour(scene, rng):
  return _q_attribute(scene, rng, "colour")


def q_shape(scene, rng):
  return _q_attribute(scene, rng, "shape")


def q_counting(scene, rng):
  kind = rng.integers(3)
  if kind == 0:
    n, text, facets = len(scene), "how many objects are there?", ()
  elif kind == 1:
    c = COLOURS[rng.integers(len(COLOURS))] if rng.random() < 0.3 else \
        scene.objects[rng.integers(len(scene))].colour
    n, text = len(scene.select(colour=c)), f"how many {c} objects are there?"
    facets = (("colour", c),)
  else:
    s = SHAPES[rng.integers(len(SHAPES))] if rng.random() < 0.3 else \
        scene.objects[rng.integers(len(scene))].shape
    n, text = len(scene.select(shape=s)), f"how many {plural(s)} are there?"
    facets = (("shape", s),)
  return Question(text, NUMBERS[n], "counting", (("answer", NUMBERS[n]), ("n", n)) + facets)


def q_existence(scene, rng):
  if rng.random() < 0.5:
    o = scene.objects[rng.integers(len(scene))]
    c, s, ans = o.colour, o.shape, "yes"
  else:
    # Absent combinations, preferring ones whose colour and shape both occur
    # elsewhere in the scene (the hallucination-prone case).
    present = {(o.colour, o.shape) for o in scene.objects}
    colours = {o.colour for o in scene.objects}
    shapes = {o.shape for o in scene.objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    tricky = [(c, s) for c, s in absent if c in colours and s in shapes]
    pool = tricky if tricky and rng.random() < 0.6 else absent
    c, s = pool[rng.integers(len(pool))]
    ans = "no"
  return Question(f"is there {article(c)} {c} {s}?", ans, "existence",
                  (("answer", ans), ("colour", c), ("shape", s)))


def _pairs(scene, rng, ok: Callable[[Obj, Obj], bool]):
  objs = list(scene.objects)
  pairs = [(a, b) for a in objs for b in objs if a != b and ok(a, b)]
  rng.shuffle(pairs)
  for a, b in pairs:
    ra, rb = unique_ref(scene, a), unique_ref(scene, b)
    if ra and rb:
      return a, b, ra, rb
  return None


def q_spatial(scene, rng):
  horizontal = rng.random() < 0.5
  for horiz in (horizontal, not horizontal):
    if horiz:
      found = _pairs(scene, rng, lambda a, b: a.col != b.col)
      if found:
        a, b, ra, rb = found
        ans = "left" if a.col < b.col else "right"
        return Question(f"is the {ra} left or right of the {rb}?", ans, "spatial",
                        (("answer", ans), ("colour", a.colour), ("shape", a.shape),
                         ("size", a.size)))
    else:
      found = _pairs(scene, rng, lambda a, b: a.row != b.row)
      if found:
        a, b, ra, rb = found
        ans = "above" if a.row < b.row else "below"
        return Question(f"is the {ra} above or below the {rb}?", ans, "spatial",
                        (("answer", ans), ("colour", a.colour), ("shape", a.shape),
                         ("size", a.size)))
  return None


def q_size(scene, rng):
  found = _pairs(scene, rng, lambda a, b: a.size != b.size)
  if not found:
    return None
  a, b, ra, rb = found
  ans = "bigger" if SIZE_RANK[a.size] > SIZE_RANK[b.size] else "smaller"
  return Question(f"is the {ra} bigger or smaller than the {rb}?", ans, "size",
                  (("answer", ans), ("colour", a.colour), ("shape", a.shape),
                   ("size", a.size)))


def q_binding(scene, rng):
  objs = list(scene.objects)
  rng.shuffle(objs)
  for o in objs:
    if len(scene.select(colour=o.colour, shape=o.shape)) != 1:
      continue
    other_colour = [x for x in scene.select(colour=o.colour) if x != o]
    other_shape = [x for x in scene.select(shape=o.shape) if x != o]
    if other_colour and other_shape:
      return Question(f"what size is the {o.colour} {o.shape}?", o.size, "binding",
                      (("answer", o.size), ("colour", o.colour), ("shape", o.shape),
                       ("size", o.size)))
  return None


def q_small_object(scene, rng):
  small = scene.select(size="small")
  rng.shuffle(small)
  for o in small:
    if len(scene.select(size="small", colour=o.colour)) == 1:
      return Question(f"what shape is the small {o.colour} object?", o.shape,
                      "small_object",
                      (("answer", o.shape), ("colour", o.colour), ("shape", o.shape),
                       ("size", o.size)))
  return None


TEMPLATES: dict[str, Callable] = {
    "colour": q_colour, "shape": q_shape, "counting": q_counting,
    "existence": q_existence, "spatial": q_spatial, "size": q_size,
    "binding": q_binding, "small_object": q_small_object,
}
assert tuple(TEMPLATES) == SKILLS


def ask(scene: Scene, skill: str, rng: np.random.Generator) -> Question | None:
  if skill not in TEMPLATES:
    raise ValueError(f"unknown skill {skill!r}; skills are {SKILLS}")
  if not len(scene):
    return None
  return TEMPLATES[skill](scene, rng)


def counting_scene(rng: np.random.Generator):
  """A scene and counting question with the count drawn uniformly (counts of
  a random scene pile up at 0-2, which starves the large counts)."""
  kind = int(rng.integers(3))
  if kind == 0:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    return _scene_with(rng, n, lambda o: True, None), None
  n = int(rng.integers(0, 7))
  extra = int(rng.integers(0 if n else 1, MAX_OBJECTS - n + 1))
  if kind == 1:
    c = COLOURS[rng.integers(len(COLOURS))]
    scene = _scene_with(rng, n, lambda o: o.colour == c, {"colour": c}, extra)
    q = Question(f"how many {c} objects are there?", NUMBERS[n], "counting",
                 (("answer", NUMBERS[n]), ("n", n), ("colour", c)))
  else:
    sh = SHAPES[rng.integers(len(SHAPES))]
    scene = _scene_with(rng, n, lambda o: o.shape == sh, {"shape": sh}, extra)
    q = Question(f"how many {plural(sh)} are there?", NUMBERS[n], "counting",
                 (("answer", NUMBERS[n]), ("n", n), ("shape", sh)))
  return scene, q


def _scene_with(rng, n, matches, fixed, extra=0):
  """n objects with the `fixed` attributes plus `extra` objects without them."""
  cells = rng.permutation(GRID * GRID)[:n + extra]
  objs = []
  for i, cell in enumerate(cells):
    while True:
      o = Obj(int(cell) // GRID, int(cell) % GRID, SHAPES[rng.integers(len(SHAPES))],
              COLOURS[rng.integers(len(COLOURS))], SIZES[rng.integers(len(SIZES))])
      if i < n and fixed:
        o = dataclasses.replace(o, **fixed)
      if (i < n) == bool(matches(o)):
        break
    objs.append(o)
  return Scene(tuple(objs))


def scene_for_skill(skill: str, rng: np.random.Generator, tries: int = 200):
  """A random scene and a question of `skill` about it (scenes are redrawn
  until the template applies; binding and small_object need specific layouts,
  so their scenes are biased towards them; counting draws its count first)."""
  from auditdm_jax.scenes.world import random_scene
  if skill == "counting":
    scene, q = counting_scene(rng)
    if q is None:
      q = Question("how many objects are there?", NUMBERS[len(scene)], "counting",
                   (("answer", NUMBERS[len(scene)]), ("n", len(scene))))
    return scene, q
  for _ in range(tries):
    lo = 3 if skill in ("binding",) else 1
    scene = random_scene(rng, min_objects=lo)
    if skill == "small_object" and not scene.select(size="small"):
      continue
    q = ask(scene, skill, rng)
    if q is not None:
      return scene, q
  raise RuntimeError(f"no scene for skill {skill!r} in {tries} tries")
