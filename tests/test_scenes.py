"""The scene world: renderer, question templates, edit / caption / question
languages and planted gaps. Pure numpy; the whole file runs in seconds."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from auditdm_jax.scenes import captions as C
from auditdm_jax.scenes import edits as E
from auditdm_jax.scenes import gaps as G
from auditdm_jax.scenes import parse as P
from auditdm_jax.scenes import questions as Q
from auditdm_jax.scenes.examples import example
from auditdm_jax.scenes.world import (
  BACKGROUND,
  CELL,
  COLOURS,
  IMAGE_SIZE,
  MAX_OBJECTS,
  RGB,
  SHAPES,
  SIZES,
  Obj,
  Scene,
  random_scene,
  render,
)

# A hand-built scene: a small red circle top left, a large red square top right,
# a medium blue circle bottom centre.
RED_CIRCLE = Obj(0, 0, "circle", "red", "small")
RED_SQUARE = Obj(0, 2, "square", "red", "large")
BLUE_CIRCLE = Obj(2, 1, "circle", "blue", "medium")
SCENE = Scene((RED_CIRCLE, RED_SQUARE, BLUE_CIRCLE))


def _cell(img, row, col):
  return img[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]


# -- renderer --------------------------------------------------------------------------

def test_render_is_deterministic():
  a, b = render(SCENE), render(Scene.from_json(SCENE.to_json()))
  assert a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
  assert a.tobytes() == b.tobytes()
  rng = np.random.default_rng(0)
  for _ in range(20):
    s = random_scene(rng)
    assert render(s).tobytes() == render(Scene(tuple(reversed(s.objects)))).tobytes()


def test_render_colour_changes_only_its_cell():
  other = SCENE.replace_object(BLUE_CIRCLE, dataclasses.replace(BLUE_CIRCLE,
                                                                colour="yellow"))
  a, b = render(SCENE), render(other)
  diff = np.any(a != b, axis=-1)
  assert diff[2 * CELL:3 * CELL, CELL:2 * CELL].sum() > 20
  diff[2 * CELL:3 * CELL, CELL:2 * CELL] = False
  assert not diff.any()
  # The centre pixel of the cell is the exact object colour.
  centre = _cell(b, 2, 1)[CELL // 2, CELL // 2]
  assert tuple(centre) == RGB["yellow"]


def test_render_empty_cells_are_background_and_edges_antialiased():
  img = render(Scene((Obj(1, 1, "circle", "red", "large"),)))
  assert (img[:CELL] == BACKGROUND).all()
  cell = _cell(img, 1, 1).reshape(-1, 3).astype(int)
  exact = np.all(cell == RGB["red"], axis=1) | np.all(cell == BACKGROUND, axis=1)
  mixed = cell[~exact]
  assert len(mixed) >= 8      # the rim of the circle
  # Mixed pixels lie strictly between background and object colour.
  lo = np.minimum(RGB["red"], BACKGROUND)
  hi = np.maximum(RGB["red"], BACKGROUND)
  assert np.all((mixed >= lo) & (mixed <= hi))
  assert np.any((mixed[:, 0] > lo[0]) & (mixed[:, 0] < hi[0]))


def test_render_shapes_and_sizes_differ():
  imgs = {(s, z): render(Scene((Obj(0, 0, s, "green", z),)))
          for s in SHAPES for z in SIZES}
  assert len({im.tobytes() for im in imgs.values()}) == len(SHAPES) * len(SIZES)
  for s in SHAPES:
    area = [int(np.any(imgs[s, z] != BACKGROUND, axis=-1).sum()) for z in SIZES]
    assert area[0] < area[1] < area[2], (s, area)


# -- question templates on a hand-built scene -------------------------------------------

EXPECTED = {
    "colour": {"what colour is the small circle?": "red",
               "what colour is the square?": "red",
               "what colour is the medium circle?": "blue"},
    "shape": {"what shape is the blue object?": "circle"},
    "counting": {"how many objects are there?": "three",
                 **{f"how many {c} objects are there?":
                    {"red": "two", "blue": "one"}.get(c, "zero") for c in COLOURS},
                 **{f"how many {s}s are there?":
                    {"circle": "two", "square": "one"}.get(s, "zero") for s in SHAPES}},
    "existence": {f"is there {'an' if c == 'orange' else 'a'} {c} {s}?":
                  "yes" if (c, s) in {("red", "circle"), ("red", "square"),
                                      ("blue", "circle")} else "no"
                  for c in COLOURS for s in SHAPES},
    "spatial": {
        "is the red circle left or right of the square?": "left",
        "is the red circle left or right of the blue object?": "left",
        "is the square left or right of the red circle?": "right",
        "is the square left or right of the blue object?": "right",
        "is the blue object left or right of the red circle?": "right",
        "is the blue object left or right of the square?": "left",
        "is the red circle above or below the blue object?": "above",
        "is the square above or below the blue object?": "above",
        "is the blue object above or below the red circle?": "below",
        "is the blue object above or below the square?": "below",
    },
    "size": {
        "is the red circle bigger or smaller than the square?": "smaller",
        "is the red circle bigger or smaller than the blue object?": "smaller",
        "is the square bigger or smaller than the red circle?": "bigger",
        "is the square bigger or smaller than the blue object?": "bigger",
        "is the blue object bigger or smaller than the red circle?": "bigger",
        "is the blue object bigger or smaller than the square?": "smaller",
    },
    "binding": {"what size is the red circle?": "small"},
    "small_object": {"what shape is the small red object?": "circle"},
}


@pytest.mark.parametrize("skill", Q.SKILLS)
def test_templates_answer_hand_built_scene(skill):
  expected = EXPECTED[skill]
  seen = set()
  for seed in range(60):
    q = Q.ask(SCENE, skill, np.random.default_rng(seed))
    assert q is not None and q.skill == skill
    assert q.text in expected, q.text
    assert q.answer == expected[q.text], q
    assert q.facet("answer") == q.answer
    seen.add(q.text)
  if skill not in ("counting", "existence"):
    assert seen == set(expected)   # every possible question does come up
  # The question parser gives the same answers for every wording.
  for text, answer in expected.items():
    got = P.answer_question(SCENE, text)
    assert (got.answer, got.skill) == (answer, skill), text


def test_templates_refuse_impossible_questions():
  one = Scene((RED_CIRCLE,))
  rng = np.random.default_rng(0)
  for skill in ("spatial", "size", "binding"):
    assert Q.ask(one, skill, rng) is None
  assert Q.ask(Scene((RED_SQUARE,)), "small_object", rng) is None
  assert Q.ask(Scene(()), "colour", rng) is None


# -- edit language ---------------------------------------------------------------------

EDITS = [
    ("recolour the small circle to green",
     SCENE.replace_object(RED_CIRCLE, dataclasses.replace(RED_CIRCLE, colour="green")),
     "colour"),
    ("reshape the square into a diamond",
     SCENE.replace_object(RED_SQUARE, dataclasses.replace(RED_SQUARE, shape="diamond")),
     "shape"),
    ("resize the blue object to large",
     SCENE.replace_object(BLUE_CIRCLE, dataclasses.replace(BLUE_CIRCLE, size="large")),
     "size"),
    ("move the large red square to the middle centre",
     SCENE.replace_object(RED_SQUARE, dataclasses.replace(RED_SQUARE, row=1, col=1)),
     "position"),
    ("add a medium purple triangle at the bottom right",
     SCENE.replace_object(None, Obj(2, 2, "triangle", "purple", "medium")), "presence"),
    ("remove the red circle", Scene((RED_SQUARE, BLUE_CIRCLE)), "presence"),
]


@pytest.mark.parametrize("text,after,factor", EDITS)
def test_edit_ops(text, after, factor):
  edit = E.parse_edit(text)
  assert edit.op == text.split()[0]
  assert E.edit_text(edit) == text
  assert E.apply_edit(SCENE, text) == after
  assert E.apply_edit(SCENE, edit) == after
  assert E.try_edit(SCENE, text) == (after, "")
  assert E.changed_factor(SCENE, after, text) == factor
  # Trailing full stop, capitals and extra spaces are tolerated.
  assert E.apply_edit(SCENE, "  " + text.capitalize().replace(" ", "  ") + ". ") == after


def test_edit_structure():
  e = E.parse_edit("move the small red object to the bottom left")
  assert (e.op, e.size, e.colour, e.shape, e.arg) == ("move", "small", "red", None,
                                                      (2, 0))
  a = E.parse_edit("add an large orange square at the top centre")
  assert a.arg == Obj(0, 1, "square", "orange", "large")
  assert a.ref == {"size": None, "colour": None, "shape": None}
  r = E.parse_edit("reshape the large red object into an square")
  assert (r.size, r.colour, r.shape, r.arg) == ("large", "red", None, "square")


def test_edit_round_trip_and_random_edits():
  rng = np.random.default_rng(1)
  ops = dict.fromkeys(E.OPS, 0)
  for _ in range(600):
    scene = random_scene(rng, min_objects=2, max_objects=7)
    text = E.random_edit(scene, rng)
    edit = E.parse_edit(text)
    assert E.edit_text(edit) == text
    assert E.parse_edit(text + ".") == edit
    after = E.apply_edit(scene, text)
    ops[edit.op] += 1
    # The diff between the scenes is exactly what the factor says.
    gone = set(scene.objects) - set(after.objects)
    new = set(after.objects) - set(scene.objects)
    factor = E.changed_factor(scene, after, text)
    if factor == "presence":
      assert (len(gone), len(new)) in ((1, 0), (0, 1))
    else:
      (a,), (b,) = gone, new
      fields = {"colour": ("colour",), "shape": ("shape",), "size": ("size",),
                "position": ("row", "col")}[factor]
      changed = {f for f in ("row", "col", "shape", "colour", "size")
                 if getattr(a, f) != getattr(b, f)}
      assert changed and changed <= set(fields)
  # Uniform over the six ops (each 100 expected).
  assert all(60 <= n <= 140 for n in ops.values()), ops


def test_random_edit_respects_the_scene():
  rng = np.random.default_rng(2)
  full = random_scene(rng, min_objects=MAX_OBJECTS)
  ops = {E.parse_edit(E.random_edit(full, rng)).op for _ in range(100)}
  assert "add" not in ops and ops
  single = Scene((RED_CIRCLE,))
  ops = {E.parse_edit(E.random_edit(single, rng)).op for _ in range(100)}
  assert ops == {"recolour", "reshape", "resize", "move", "add"}
  # Two identical objects can be named by no reference: only "add" is possible.
  twins = Scene((RED_CIRCLE, dataclasses.replace(RED_CIRCLE, row=2)))
  assert E.possible_ops(twins) == ("add",)
  assert E.random_edit(twins, rng).startswith("add a ")
  clones = Scene(tuple(Obj(i // 3, i % 3, "circle", "red", "small") for i in range(8)))
  with pytest.raises(E.EditError, match="no edit is possible"):
    E.random_edit(clones, rng)


@pytest.mark.parametrize("text,problem", [
    ("", "empty"),
    ("paint the circle to red", "unknown command 'paint'"),
    ("recolour the circle to pink", "unknown colour 'pink'"),
    ("recolour the circle blue", "too short"),
    ("recolour a circle to blue", "expected 'the', got 'a'"),
    ("recolour the red small circle to blue", "size 'small' must come first"),
    ("recolour the red blue circle to green", "two colours"),
    ("recolour the circle square to green", "'circle' can only be the last word"),
    ("recolour the object to green", "names no size, colour or shape"),
    ("recolour the shiny circle to green", "unknown word 'shiny'"),
    ("reshape the circle into a oval", "unknown shape 'oval'"),
    ("reshape the circle to a square", "expected 'into', got 'to'"),
    ("resize the circle to huge", "unknown size 'huge'"),
    ("move the circle to the top", "too short"),
    ("move the circle to the upper left", "unknown row 'upper'"),
    ("move the circle to the top middle", "unknown column 'middle'"),
    ("add a red circle at the top left", "expected 9 words"),
    ("add the small red circle at the top left", "expected 'a' or 'an', got 'the'"),
    ("add a small red circle in the top left", "expected 'at', got 'in'"),
    ("remove the", "too short"),
    ("remove the circles", "must end in a shape"),
])
def test_edit_rejects_malformed_text(text, problem):
  with pytest.raises(E.EditError, match=re.escape(problem)) as info:
    E.parse_edit(text)
  assert repr(text.strip()) in str(info.value)
  scene, reason = E.try_edit(SCENE, text)
  assert scene is None and problem.split("'")[0] in reason


@pytest.mark.parametrize("scene,text,problem", [
    (SCENE, "recolour the circle to green", "ambiguous, 2 objects"),
    (SCENE, "remove the red object", "ambiguous, 2 objects"),
    (SCENE, "resize the triangle to small", "no object in the scene is a triangle"),
    (SCENE, "remove the large circle", "no object in the scene is a large circle"),
    (SCENE, "move the square to the top left", "occupied by the small red circle"),
    (SCENE, "add a small red circle at the bottom centre", "bottom centre cell is occ"),
    (random_scene(np.random.default_rng(3), min_objects=8),
     "add a small red circle at the top left", "the scene is full"),
    (SCENE, "recolour the square to red", "changes nothing"),
    (SCENE, "reshape the square into a square", "changes nothing"),
    (SCENE, "resize the square to large", "changes nothing"),
    (SCENE, "move the square to the top right", "changes nothing"),
    (Scene((RED_CIRCLE,)), "remove the circle", "cannot remove the last object"),
])
def test_edit_rejects_impossible_edits(scene, text, problem):
  E.parse_edit(text)    # well formed
  with pytest.raises(E.EditError, match=re.escape(problem)):
    E.apply_edit(scene, text)
  got, reason = E.try_edit(scene, text)
  assert got is None and problem in reason and repr(text) in reason


def test_edit_dataclass_validates_and_changed_factor_checks():
  with pytest.raises(E.EditError, match="unknown edit op"):
    E.Edit("paint", shape="circle", arg="red")
  with pytest.raises(E.EditError, match="unknown colour"):
    E.Edit("recolour", shape="circle", arg="pink")
  with pytest.raises(E.EditError, match="outside the grid"):
    E.Edit("move", shape="circle", arg=(3, 0))
  with pytest.raises(E.EditError, match="does not turn"):
    E.changed_factor(SCENE, SCENE, "remove the square")


def test_edit_and_caption_forms_of_the_tokenizer_corpus():
  """Every edit command and caption in text.corpus parses (the corpus is what
  the world tokenizer is trained on, so the languages must agree with it)."""
  from auditdm_jax.scenes import text as T  # pylint: disable=import-outside-toplevel
  lines = T.corpus(n=40, seed=5)
  n_edits = n_captions = 0
  for line in lines:
    first = line.split(" ", 1)[0]
    if first in E.OPS:
      assert E.edit_text(E.parse_edit(line)) == line
      n_edits += 1
    elif first == "a":
      scene = C.parse_caption(line)
      assert C.caption(scene) == line
      n_captions += 1
  assert n_edits == 6 * 40 and n_captions == 40
  assert all(T.cell_name(r, c) == E.cell_text(r, c) for r in range(3) for c in range(3))


# -- caption language ------------------------------------------------------------------

def test_caption_round_trip():
  assert C.caption(SCENE) == ("a small red circle at the top left and a large red square "
                              "at the top right and a medium blue circle at the bottom "
                              "centre")
  rng = np.random.default_rng(4)
  for _ in range(300):
    s = random_scene(rng)
    text = C.caption(s)
    assert C.parse_caption(text) == s
    assert C.parse_caption(text + ".") == s
    assert len(text.split(" and ")) == len(s)
    # Clause order does not matter.
    clauses = text.split(" and ")
    rng.shuffle(clauses)
    assert C.try_caption(" and ".join(clauses)) == (s, "")


@pytest.mark.parametrize("text,problem", [
    ("", "empty caption"),
    (".", "empty caption"),
    ("a small red circle at the top left and", "clause 2 is empty"),
    ("and a small red circle at the top left", "clause 1 is empty"),
    ("a small red circle at the top left and a large blue square at the top left",
     "clauses 1 and 2 both put an object at the top left"),
    (" and ".join(f"a small red circle at the {r} {c}" for r in ("top", "middle",
                                                                 "bottom")
                  for c in ("left", "centre", "right")), "9 clauses"),
    ("a tiny red circle at the top left", "unknown size 'tiny'"),
    ("a small pink circle at the top left", "unknown colour 'pink'"),
    ("a small red blob at the top left", "unknown shape 'blob'"),
    ("a small red circle at top left", "7 words"),
    ("a red circle at the top left", "7 words"),
    ("the small red circle at the top left", "starts with 'a', not 'the'"),
    ("a small red circle on the top left", "expected 'at the'"),
    ("a small red circle at the top middle", "unknown column 'middle'"),
    ("a small red circle at the top left with a large blue square at the top right",
     "17 words"),
])
def test_caption_rejections(text, problem):
  with pytest.raises(C.CaptionError, match=re.escape(problem)):
    C.parse_caption(text)
  scene, reason = C.try_caption(text)
  assert scene is None and problem.split("'")[0] in reason
  with pytest.raises(C.CaptionError, match="empty scene"):
    C.caption(Scene(()))


# -- free questions ----------------------------------------------------------------------

def test_question_parser_agrees_with_generators():
  rng = np.random.default_rng(5)
  for i in range(3000):
    skill = Q.SKILLS[i % len(Q.SKILLS)]
    scene, q = Q.scene_for_skill(skill, rng)
    got = P.answer_question(scene, q.text)
    assert (got.text, got.answer, got.skill, got.facets) == (
        q.text, q.answer, q.skill, q.facets), (scene, q)


def _all_refs(scene, obj):
  return [E.ref_text(**r) for r in E.unique_refs(scene, obj)]


def test_question_parser_any_noun_phrase():
  """Every unique reference of every object, not only the shortest, gives the
  object's true attributes and relations."""
  rng = np.random.default_rng(6)
  n_checked = 0
  for _ in range(60):
    scene = random_scene(rng, min_objects=2)
    refs = {o: _all_refs(scene, o) for o in scene.objects}
    for a in scene.objects:
      for ra in refs[a]:
        facets = (("colour", a.colour), ("shape", a.shape), ("size", a.size))
        q = P.answer_question(scene, f"what colour is the {ra}?")
        assert (q.answer, q.skill, q.facets[1:]) == (a.colour, "colour", facets)
        q = P.answer_question(scene, f"what size is the {ra}?")
        assert (q.answer, q.skill) == (a.size, "binding")
        q = P.answer_question(scene, f"what shape is the {ra}?")
        small = ra.startswith("small ") and ra.endswith(" object") and ra.count(" ") == 2
        assert (q.answer, q.skill) == (a.shape, "small_object" if small else "shape")
        assert P.answer_question(scene, f"is there a {ra}?").answer == "yes"
        for b in scene.objects:
          if b == a or not refs[b]:
            continue
          rb = refs[b][-1]
          q, why = P.try_answer(scene, f"is the {ra} left or right of the {rb}?")
          if a.col == b.col:
            assert q is None and "same column" in why
          else:
            assert q.answer == ("left" if a.col < b.col else "right")
            assert q.facets == (("answer", q.answer),) + facets
          q, why = P.try_answer(scene, f"is the {ra} above or below the {rb}?")
          if a.row == b.row:
            assert q is None and "same row" in why
          else:
            assert q.answer == ("above" if a.row < b.row else "below")
          q, why = P.try_answer(scene, f"is the {ra} bigger or smaller than the {rb}?")
          if a.size == b.size:
            assert q is None and "same size" in why
          else:
            assert q.answer == ("bigger" if SIZES.index(a.size) > SIZES.index(b.size)
                                else "smaller")
            assert q.skill == "size"
          n_checked += 1
  assert n_checked > 2000, n_checked


def test_question_parser_counting_and_existence():
  q = P.answer_question(SCENE, "how many red objects are there?")
  assert (q.answer, q.facets) == ("two", (("answer", "two"), ("n", 2), ("colour", "red")))
  q = P.answer_question(SCENE, "How many  small red circles are there")
  assert q.text == "how many small red circles are there?"
  assert (q.answer, q.facets) == ("one", (("answer", "one"), ("n", 1), ("colour", "red"),
                                          ("shape", "circle"), ("size", "small")))
  assert P.answer_question(SCENE, "how many large circles are there?").answer == "zero"
  q = P.answer_question(SCENE, "is there an orange object?")
  assert (q.answer, q.skill, q.facets) == ("no", "existence",
                                           (("answer", "no"), ("colour", "orange")))
  assert P.answer_question(SCENE, "is there a medium circle?").answer == "yes"
  assert P.answer_question(SCENE, "is there a small blue circle?").answer == "no"


@pytest.mark.parametrize("text,problem", [
    ("", "empty question"),
    ("what is the colour of the square?", "not a question of the world"),
    ("what colour is a square?", "expected 'the'"),
    ("what colour is the circle?", "ambiguous, 2 objects"),
    ("what shape is the red object?", "ambiguous"),
    ("what size is the green circle?", "no object in the scene is a green circle"),
    ("what colour is the object?", "names no size, colour or shape"),
    ("what colour is the shiny square?", "unknown word 'shiny'"),
    ("how many circle are there?", "must end in a shape"),
    ("how many circles are here?", "the form is 'how many"),
    ("is there the square?", "the form is 'is there a REF?'"),
    ("is the square near the blue object?", "expected 'left or right of the'"),
    ("is the square above or below the red circle?", "same row"),
    ("is the square left or right of the large red object?", "relates an object to it"),
    ("is the square bigger or smaller than the triangle?", "no object in the scene is a"),
    ("is the red square left or right of the circle?", "ambiguous"),
])
def test_question_parser_rejections(text, problem):
  with pytest.raises(P.QuestionError, match=re.escape(problem)):
    P.answer_question(SCENE, text)
  q, reason = P.try_answer(SCENE, text)
  assert q is None and problem.split("'")[0] in reason


def test_question_parser_ill_posed_pairs():
  same_col = Scene((Obj(0, 1, "circle", "red", "small"),
                    Obj(2, 1, "square", "red", "small")))
  with pytest.raises(P.QuestionError, match="same column"):
    P.answer_question(same_col, "is the circle left or right of the square?")
  with pytest.raises(P.QuestionError, match="same size"):
    P.answer_question(same_col, "is the circle bigger or smaller than the square?")
  assert P.answer_question(same_col, "is the circle above or below the square?").answer \
      == "above"


# -- gaps ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,canonical,kind", [
    ("colour:*", "colour:*", "all"),
    (" spatial : left ", "spatial:left", "word"),
    ("binding:red", "binding:red", "word"),
    ("shape: colour = blue", "shape:colour=blue", "facet"),
    ("binding:answer=small", "binding:answer=small", "facet"),
    ("counting:n>=4", "counting:n>=4", "count"),
    ("counting: n  <  2", "counting:n<2", "count"),
    ("counting:n!=0", "counting:n!=0", "count"),
    ("counting:n==8", "counting:n==8", "count"),
    ("counting:seven", "counting:seven", "word"),
    ("existence:no", "existence:no", "word"),
])
def test_gap_spec_parse(text, canonical, kind):
  g = G.GapSpec.parse(text)
  assert (str(g), g.kind) == (canonical, kind)
  assert G.GapSpec.parse(str(g)) == g


@pytest.mark.parametrize("text,problem", [
    ("", "empty"),
    ("   ", "empty"),
    ("colour", "no ':'"),
    ("colours:*", "unknown skill 'colours'; skills are colour, shape, counting"),
    ("colour:", "empty filter"),
    ("colour:pink", "unknown word 'pink'"),
    ("colour:colour=pink", "unknown word 'pink'"),
    ("colour:weight=red", "unknown facet 'weight'"),
    ("binding:answer=red", "not a possible answer of a binding question"),
    ("shape:shape=red", "not a possible shape"),
    ("spatial:bigger", "can never occur in a spatial question"),
    ("colour:yes", "can never occur"),
    ("counting:nine", "can never occur"),
    ("colour:n>=2", "needs the counting skill"),
    ("counting:n=>2", "bad operator '=>'"),
    ("counting:n=2", "bad operator '='"),
    ("counting:n<>2", "bad operator"),
    ("counting:n>=two", "'two' is not an integer"),
    ("counting:n>8", "selects no question"),
    ("counting:n<0", "selects no question"),
])
def test_gap_spec_rejections(text, problem):
  with pytest.raises(G.GapSpecError, match=re.escape(problem)) as info:
    G.GapSpec.parse(text)
  assert repr(text) in str(info.value)


def test_parse_gaps_reports_every_problem():
  assert [str(g) for g in G.parse_gaps(["colour:*", "counting:n>=4"])] == [
      "colour:*", "counting:n>=4"]
  assert G.parse_gaps("colour:red, spatial:left") == (G.GapSpec.parse("colour:red"),
                                                      G.GapSpec.parse("spatial:left"))
  with pytest.raises(G.GapSpecError) as info:
    G.parse_gaps(["colour:red", "colour: red", "shapes:*", "size:n>2"])
  msg = str(info.value)
  assert "3 invalid" in msg and "repeats 'colour:red'" in msg
  assert "unknown skill 'shapes'" in msg and "needs the counting skill" in msg
  with pytest.raises(G.GapSpecError, match="unknown skill"):
    G.GapSpec("colours")
  with pytest.raises(G.GapSpecError, match="unknown filter kind"):
    G.GapSpec("colour", "regex")


def test_gap_matching():
  red_count = {"answer": "two", "n": 2, "colour": "red"}
  circles = {"answer": "five", "n": 5, "shape": "circle"}
  spec = G.GapSpec.parse("counting:red")
  assert spec.matches("counting", red_count) and not spec.matches("counting", circles)
  assert not spec.matches("colour", red_count)
  n4 = G.GapSpec.parse("counting:n>=4")
  assert n4.matches("counting", circles) and not n4.matches("counting", red_count)
  assert n4.matches("counting", json.dumps(circles))
  assert not n4.matches("counting", {"answer": "four"})      # no n facet
  five = G.GapSpec.parse("counting:five")
  assert five.matches("counting", circles) and not five.matches("counting", red_count)
  q = Q.Question("what size is the red circle?", "small", "binding",
                 (("answer", "small"), ("colour", "red"), ("shape", "circle"),
                  ("size", "small")))
  assert G.GapSpec.parse("binding:circle").matches(q.skill, q.facets)
  assert G.GapSpec.parse("binding:shape=circle").matches(q.skill, q.facets)
  assert not G.GapSpec.parse("binding:colour=blue").matches(q.skill, q.facets)
  assert not G.GapSpec.parse("binding:answer=large").matches(q.skill, q.facets)
  assert G.GapSpec.parse("binding:*").matches(q.skill, q.facets)
  # Against generated questions: "spatial:left" is exactly the left answers.
  rng = np.random.default_rng(7)
  left = G.GapSpec.parse("spatial:answer=left")
  for _ in range(200):
    _, q = Q.scene_for_skill("spatial", rng)
    assert left.matches(q.skill, q.facets) == (q.answer == "left")


_KINDS = (COLOURS, SHAPES, SIZES, Q.NUMBERS[:MAX_OBJECTS + 1], Q.YES_NO,
          ("left", "right"), ("above", "below"), Q.COMPARISONS)


def test_corruption_is_a_wrong_answer_of_the_same_kind():
  assert [G.confuse(w) for w in ("red", "orange", "circle", "diamond", "large", "zero",
                                 "three", "eight", "yes", "left", "below", "bigger")] \
      == ["green", "red", "square", "circle", "small", "one", "two", "seven", "no",
          "right", "above", "smaller"]
  rng = np.random.default_rng(8)
  n_seen = dict.fromkeys(Q.SKILLS, 0)
  for i in range(1600):
    skill = Q.SKILLS[i % len(Q.SKILLS)]
    _, q = Q.scene_for_skill(skill, rng)
    spec = G.GapSpec.parse(f"{skill}:*")
    wrong = G.corrupt_answer(spec, q.skill, q.facets, q.answer)
    assert wrong != q.answer
    kind = next(k for k in _KINDS if q.answer in k)
    assert wrong in kind and wrong in G.SKILL_ANSWERS[skill]
    assert G.corrupt_answer(spec, q.skill, q.facets, q.answer) == wrong  # deterministic
    n_seen[skill] += 1
  assert min(n_seen.values()) == 200
  with pytest.raises(G.GapSpecError, match="not in gap"):
    G.corrupt_answer(G.GapSpec.parse("colour:red"), "colour", {"answer": "blue"}, "blue")
  with pytest.raises(ValueError, match="not an answer word"):
    G.confuse("maybe")


def test_apply_gaps_and_gap_mask():
  records = [example(0, i) for i in range(64)]
  gaps = G.parse_gaps(["counting:*", "spatial:left"])
  corrupted = removed = 0
  for r in records:
    before = dict(r)
    hit = r["skill"] == "counting" or (r["skill"] == "spatial" and r["answer"] == "left")
    c = G.apply_gaps(r, gaps, "corrupt")
    d = G.apply_gaps(r, gaps, "remove")
    assert r["answer"] == before["answer"]       # the input is never mutated
    if hit:
      assert c["answer"] != r["answer"] and c["question"] == r["question"]
      assert d is None
      corrupted += 1
      removed += 1
    else:
      assert c is r and d is r
  assert corrupted == removed and corrupted >= 8
  with pytest.raises(ValueError, match="unknown gap mode"):
    G.apply_gaps(records[0], gaps, "flip")
  assert G.apply_gaps(records[2], ["counting:*"], "remove") is None   # skill 2: counting
  mask = G.gap_mask(records, "counting:*")
  assert mask.dtype == bool and mask.sum() == 8
  assert list(np.flatnonzero(mask)) == [i for i, r in enumerate(records)
                                        if r["skill"] == "counting"]
  both = G.gap_mask(records, gaps)
  assert both.sum() == corrupted
