"""Hostile text (hypothesis properties): every parser of model- or
user-written text accepts it or rejects it with its documented error (a
ValueError subclass, or an (ok, reason) pair), never crashes with another
exception type, never hangs on bounded input, and the report never lets the
text become markup.

Parsers covered: the scene world's edit commands, captions and questions
(scenes/edits.py, captions.py, parse.py), planted-gap specs (scenes/gaps.py),
answer normalisation and the benchmark metrics (eval/metrics/), the
auditor's answer reading and the judge's prompt (audit/reward.py), the
tokenizer's encode / decode (models/tokenizer.py), FLUX's T5 and CLIP
tokenizers (diffusion/tokenizers.py: the same ids as transformers'), the
failure types' auditor-written names (mine/clusters/naming.py), the scene editor
(scenes/editor.py) and the HTML report (report/html.py). Every property is
derandomized (the same examples on every run) with no deadline; `EXAMPLES`
examples each.
"""

from __future__ import annotations

import html.parser
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditdm_jax.scenes import editor as scene_editor
from auditdm_jax.audit import reward
from auditdm_jax.eval import metrics
from auditdm_jax.models.tokenizer import train_sentencepiece
from auditdm_jax.report import html as report_html
from auditdm_jax.scenes import captions, edits, gaps, parse, questions, world
from auditdm_jax.scenes.world import Scene
from auditdm_jax.utils import answers as answers_lib

EXAMPLES = 300
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

# Strings aimed at the parsers' seams: markup, attribute breaks, format
# strings, path traversal, control and bidi characters, NULs, huge numbers.
ADVERSARIAL = [
    "", " ", "\x00", "\n\t\r", "\u202e\u2066", "\ufeff", "\u200b", "e\u0301", "\U0001f600",
    "<script>alert(1)</script>", "<SCRIPT SRC=//x>", "\" onerror=\"alert(2)", "' onload='x",
    "</textarea><img src=x onerror=alert(3)>", "<!--", "]]>", "&lt;script&gt;", "&#60;b&#62;",
    "javascript:alert(1)", "<svg onload=alert(4)>", "{0}", "{}", "{__class__}", "%s%n%x",
    "%(x)s", "${HOME}", "$(rm -rf /)", "`id`", "../../etc/passwd", "..\\..\\windows",
    "/dev/zero", "file:///etc/shadow", "C:\\con", "1e999", "-1e999", "nan", "inf", "-0",
    "9" * 400, "0x1f", "1_000", "½", "٣", "Ⅻ", "<loc1023><loc0000><loc9999><loc0001>",
    "<loc0001><loc0002><loc0003><loc0004>", "(A)", "A.", "the answer is (Z)", "?", ".",
    "and and and", "the the the", "add a", "is the", "how many are there?",
    "a" * 5000, "what colour is the " + "red " * 500 + "circle?",
]
WORLD_WORDS = (world.vocabulary() + edits.OPS + tuple(
    "a an the is are there what how many colour shape size object objects circles squares "
    "left right above below bigger smaller or of than at to top middle bottom centre "
    "center row column and yes no 0 1 2 3 4 5 6 7 8 9 ? . ,".split()))

any_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
control_text = st.text(alphabet=st.characters(whitelist_categories=("Cc", "Cf", "Zl", "Zp",
                                                                    "Zs", "Mn")),
                       max_size=50)
world_text = st.lists(st.sampled_from(WORLD_WORDS + ("<b>", "{0}", "\x00", "..", "\u202e")),
                      max_size=24).map(" ".join)
SCENES = [world.random_scene(np.random.default_rng(s)) for s in range(8)]
scenes = st.sampled_from(SCENES)


def _valid_texts() -> list[str]:
  """Well-formed questions, edit commands, captions and gap specs of the
  world: the seeds that the mutations below take deep into each grammar."""
  out = []
  for i, scene in enumerate(SCENES):
    rng = np.random.default_rng(100 + i)
    for skill in questions.SKILLS:
      q = questions.ask(scene, skill, rng)
      if q is not None:
        out.append(q.text)
    out += [edits.random_edit(scene, rng) for _ in range(4)]
    out.append(captions.caption(scene))
  return out + ["counting:n>=4", "colour:purple", "existence:no", "spatial:left",
                "colour:colour=red", "counting:*"]


VALID = _valid_texts()


@st.composite
def mutated(draw) -> str:
  """A well-formed text with hostile edits: a word replaced, a string
  inserted, words dropped or repeated, the case or spacing changed."""
  words = draw(st.sampled_from(VALID)).split(" ")
  for _ in range(draw(st.integers(0, 3))):
    i = draw(st.integers(0, len(words)))
    op = draw(st.sampled_from(("insert", "replace", "drop", "repeat", "upper", "glue")))
    junk = draw(st.one_of(st.sampled_from(ADVERSARIAL + list(WORLD_WORDS)), control_text))
    if op == "insert":
      words.insert(i, junk)
    elif words and op == "replace":
      words[min(i, len(words) - 1)] = junk
    elif words and op == "drop":
      del words[min(i, len(words) - 1)]
    elif words and op == "repeat":
      words.insert(i, words[min(i, len(words) - 1)])
    elif words and op == "upper":
      words = [w.upper() for w in words]
    elif words:
      words[min(i, len(words) - 1)] += junk
  return draw(st.sampled_from((" ", "  ", "\t", "\u3000"))).join(words)


hostile = st.one_of(any_text, control_text, world_text, st.sampled_from(ADVERSARIAL),
                    st.tuples(world_text, st.sampled_from(ADVERSARIAL), world_text)
                    .map("".join), st.sampled_from(VALID), mutated(), mutated())


def _rejects(fn, *args, errors=(ValueError,)):
  """fn(*args) returned, or raised one of `errors` with a non-empty reason."""
  try:
    return fn(*args)
  except errors as e:
    assert str(e), f"{fn.__name__} raised {type(e).__name__} with no reason"
    return None


# -- the scene world ------------------------------------------------------------------

@SETTINGS
@given(hostile, scenes)
def test_edit_commands(text, scene):
  e = _rejects(edits.parse_edit, text, errors=(edits.EditError,))
  if e is not None:
    assert edits.parse_edit(edits.edit_text(e)) == e      # what parses round-trips
  new, why = edits.try_edit(scene, text)
  assert (new is None) == bool(why)
  if new is not None:
    assert isinstance(new, Scene)
    assert edits.changed_factor(scene, new, text) in ("colour", "shape", "size",
                                                      "position", "presence")


@SETTINGS
@given(hostile)
def test_captions(text):
  s = _rejects(captions.parse_caption, text, errors=(captions.CaptionError,))
  if s is not None:
    assert captions.parse_caption(captions.caption(s)) == s
  scene, why = captions.try_caption(text)
  assert (scene is None) == bool(why)


@SETTINGS
@given(hostile, scenes, st.booleans())
def test_questions(text, scene, strict):
  q = _rejects(parse.answer_question, scene, text, strict, errors=(parse.QuestionError,))
  if q is not None:
    assert q.answer in gaps.SKILL_ANSWERS[q.skill]
  ans, why = parse.try_answer(scene, text, strict)
  assert (ans is None) == bool(why)
  attrs = parse.subject_attributes(text)
  assert isinstance(attrs, dict) and set(attrs) <= {"size", "colour", "shape"}


@SETTINGS
@given(st.one_of(hostile, st.tuples(st.sampled_from(gaps.SKILLS), hostile)
                 .map(lambda p: f"{p[0]}:{p[1]}")))
def test_gap_specs(text):
  spec = _rejects(gaps.GapSpec.parse, text, errors=(gaps.GapSpecError,))
  if spec is not None:
    assert gaps.GapSpec.parse(str(spec)) == spec
  _rejects(gaps.parse_gaps, [text, "colour:*"], errors=(gaps.GapSpecError,))
  _rejects(gaps.parse_gaps, text, errors=(gaps.GapSpecError,))


# -- answers: normalisation and metrics -----------------------------------------------

@SETTINGS
@given(hostile, st.lists(hostile, min_size=1, max_size=4))
def test_answer_normalisation_and_metrics(pred, answers):
  norm = answers_lib.vqa_official(pred)
  assert isinstance(norm, str) and "\n" not in norm and "\t" not in norm
  assert norm == norm.strip()
  for m in ("vqa", "exact", "anls", "relaxed"):
    v = _rejects(metrics.score, m, pred, {"answers": answers})
    assert v is not None and 0.0 <= v <= 1.0, (m, v)
  letter = metrics.choice_letter(pred, answers)
  assert letter is None or letter in "ABCD"[:len(answers)]
  v = _rejects(metrics.score, "choice", pred, {"options": answers, "answer": answers[0]})
  assert v in (None, 0.0, 1.0)
  assert metrics.pope_answer(pred) in ("yes", "no")
  assert metrics.mme_answer(pred) in ("yes", "no", "other")
  box = metrics.decode_loc_box(pred, (640, 480))
  assert box is None or all(np.isfinite(box))
  v = metrics.score("refcoco", pred, {"box": [1, 2, 30, 40], "image_size": [64, 48]})
  assert 0.0 <= v <= 1.0
  toks = metrics.caption_tokens(pred)
  assert all(isinstance(t, str) and t for t in toks)
  c = metrics.aggregate("cider", [{"id": "a", "prediction": pred, "references": answers}])
  assert isinstance(c, dict)
  # Malformed records are refused with a ValueError naming the problem.
  _rejects(metrics.score, "vqa", pred, {"answers": []})
  _rejects(metrics.score, "choice", pred, {"options": answers, "answer": pred})
  _rejects(metrics.score, pred, pred, {"answers": answers})


@SETTINGS
@given(hostile, st.one_of(st.none(), st.lists(hostile, min_size=1, max_size=4)))
def test_auditor_answer_reading(text, space):
  assert isinstance(answers_lib.answer_key(text), str)
  out = reward.extract_answer(text, space)
  assert isinstance(out, str)
  ids = reward.encode_answers([text, out], length=16)
  assert ids.shape == (2, 16)


# -- tokenizer -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
  texts = ["what colour is the small circle?", "a red square left of a blue triangle",
           "how many objects are there?\n3", "<b>x</b> {0} ../etc"] * 40
  return train_sentencepiece(texts, vocab_size=120, family="paligemma", num_loc=4, num_seg=2)


@SETTINGS
@given(text=hostile, ids=st.lists(st.integers(-2**40, 2**40), max_size=64))
def test_tokenizer_encode_decode(tok, text, ids):
  enc = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in enc)
  assert isinstance(tok.decode(enc), str)
  assert isinstance(tok.decode(ids), str)                 # out-of-range ids are dropped
  assert isinstance(tok.decode(ids, stop_at_eos=False), str)
  assert isinstance(tok.decode(np.asarray([i % tok.vocab_size for i in ids],
                                          dtype=np.int64)), str)


# -- FLUX's text encoders' tokenizers (diffusion/tokenizers.py) -----------------------

@pytest.fixture(scope="module")
def flux_tokenizers(tmp_path_factory):
  """Ours and transformers' T5 and CLIP tokenizers over the same tiny files."""
  transformers = pytest.importorskip("transformers")
  from auditdm_jax.diffusion.tokenizers import ClipTokenizer, T5Tokenizer  # pylint: disable=import-outside-toplevel
  from tests.flux_tokenizer_files import write_clip_tokenizer, write_t5_tokenizer  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("flux_tok")
  write_clip_tokenizer(root / "tokenizer")
  write_t5_tokenizer(root / "tokenizer_2")
  return (T5Tokenizer(str(root / "tokenizer_2")),
          transformers.T5TokenizerFast.from_pretrained(str(root / "tokenizer_2")),
          ClipTokenizer(str(root / "tokenizer")),
          transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer")))


@SETTINGS
@given(st.lists(hostile, min_size=1, max_size=3))
def test_flux_tokenizers_equal_transformers(flux_tokenizers, texts):
  """An edit instruction or caption the auditor wrote reaches FLUX's text
  encoders as transformers would tokenize it: the same ids, in the vocabulary,
  padded or truncated to the length asked; an empty text is refused by name
  (the FLUX editor rejects blank commands before they get here)."""
  t5, t5_ref, clip, clip_ref = flux_tokenizers
  for ours, theirs, length in ((t5, t5_ref, 32), (clip, clip_ref, 77)):
    if "" in texts:
      with pytest.raises(ValueError, match=f"text {texts.index('')} is empty"):
        ours(texts, length)
      continue
    got = ours(texts, length)
    want = theirs(texts, padding="max_length", max_length=length, truncation=True,
                  return_tensors="np").input_ids
    assert got.shape == (len(texts), length) and got.min() >= 0
    assert got.max() < ours.vocab_size
    bad = [(t, g.tolist(), w.tolist()) for t, g, w in zip(texts, got, want) if (g != w).any()]
    assert not bad, bad[0]


# -- the judge's prompt and the failure types' names ------------------------------------

@SETTINGS
@given(hostile, hostile)
def test_judge_prompt_and_type_names(a, b):
  """The judge's question quotes two model answers as Python literals (so a
  quote or a newline in an answer cannot end the quotation), and an
  auditor-written failure-type name becomes one short line."""
  from auditdm_jax.mine.clusters import naming  # pylint: disable=import-outside-toplevel
  q = reward.judge_prompt(a, b)
  assert q.startswith("do the answers ") and q.endswith(" mean the same?")
  assert "\n" not in q and "\r" not in q
  name = naming._clean_name(a)   # pylint: disable=protected-access
  assert len(name) <= 80 and len(name.split()) <= 8
  assert not any(c in name for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


# -- the scene editor (scenes/editor.py) -----------------------------------------------

@SETTINGS
@given(st.lists(hostile, min_size=1, max_size=4), scenes, st.booleans())
def test_scene_editor(texts, scene, strict):
  ed = scene_editor.SceneEditor(strict=strict)
  ctx = [scene.to_json()] * len(texts)
  checks = ed.check_question(ctx, texts)
  assert all(isinstance(ok, bool) and isinstance(why, str) and (ok or why)
             for ok, why in checks)
  spaces = ed.answer_space(ctx, texts)
  truths = ed.ground_truth(ctx, texts)
  for (ok, _), space, truth in zip(checks, spaces, truths):
    if ok:
      assert space is not None and truth in space
  image = world.render(scene)
  for r in ed.edit(np.stack([image] * len(texts)), texts, ctx) + ed.generate(texts):
    assert r.ok == (r.image is not None) and (r.ok or r.reason)


# -- the report (report/html.py) --------------------------------------------------------

class _Skeleton(html.parser.HTMLParser):
  """The markup of a document: its tags and their attribute names, in order."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tags: list[tuple[str, tuple[str, ...]]] = []

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, tuple(name for name, _ in attrs)))

  def handle_startendtag(self, tag, attrs):
    self.handle_starttag(tag, attrs)

  def handle_endtag(self, tag):
    self.tags.append(("/" + tag, ()))


def _skeleton(doc: str):
  p = _Skeleton()
  p.feed(doc)
  p.close()
  return p.tags


def _report_inputs(s: str, model: str):
  """Facts and a gallery with the text `s` in every text field and `model`
  as a model name (the verdicts are given, so they do not depend on it)."""
  img = np.zeros((8, 8, 3), np.uint8)
  facts = {
      "title": s, "workdir": s, "planted_gap_recall": 0.5, "exemplar_precision": 0.25,
      "planted_gaps": {model: {s: {"found": True, "rank": 1, "type": s}}},
      "failure_types": [{"name": s, "count": 3, "share": {model: 0.5}, "rate": {model: 0.2}}],
      "accuracy_before": {model: {s: 0.5, "overall": 0.5}},
      "accuracy_after": {model: {s: 0.75, "overall": 0.75}},
      "gapped_skills": {model: [s]},
      "learning_curve": [{"step": 0, "reward": 0.1, "success_rate": 0.0},
                         {"step": 5, "reward": 0.3, "success_rate": 0.2}],
      "wall_s": {s: 1.5}, "notes": [s, s],
      "unlabelled": {"failure_types": [{
          "name": s, "named_by": s, "descriptive": True, "size": 3, "count": 2, "probes": 4,
          "rate": {model: 0.5},
          "candidates": [{"name": s, "source": s, "member_rate": 0.5, "nonmember_rate": 0.1,
                          "kept": True}],
          "gallery": [{"id": s, "image": img, "question": s, "pseudo_label": s}]}],
          "planted_gap_recall": 0.5, "labelled_recall": 0.5, "clusters": 1,
          "check": {"ari_skill_answer": 0.3}},
  }
  gallery = [{"id": s, "seed_image": img, "image": img, "route": s, "auditor_text": s,
              "question": s, "pseudo_label": s, "truth": s, "category": s,
              "answers": {model: s}, "failed": [model]}]
  return facts, gallery


nonblank = hostile.filter(lambda s: s.strip() != "")


@SETTINGS
@given(nonblank, nonblank)
def test_report_never_renders_text_as_markup(s, model):
  """The document's markup is the same whatever the text: no tag, no
  attribute (no `<script`, no `onerror=`) comes from model or config text."""
  doc = report_html.render(*_report_inputs(s, model))
  plain = report_html.render(*_report_inputs("plain text", "model_a"))
  assert _skeleton(doc) == _skeleton(plain)
  assert "<script" not in doc.lower()
  assert not any(a.startswith("on") for _, attrs in _skeleton(doc) for a in attrs)


# -- bounded time on very long input ---------------------------------------------------

@pytest.mark.timeout(120)
def test_long_inputs_are_bounded(tok):
  """A 200 000-character answer or command goes through every parser without
  a hang (a quadratic blow-up would take hours; pytest-timeout stops the test
  after two minutes) and with plain-text reasons."""
  long = ("what colour is the red circle? <b>{0}</b> ../ " * 5000)[:200_000]
  scene = SCENES[0]
  edits.try_edit(scene, long)
  captions.try_caption(long)
  parse.try_answer(scene, long)
  parse.subject_attributes(long)
  _rejects(gaps.GapSpec.parse, long, errors=(gaps.GapSpecError,))
  answers_lib.vqa_official(long)
  metrics.choice_letter(long, ["red", "blue"])
  metrics.pope_answer(long)
  metrics.decode_loc_box(long, 224)
  metrics.caption_tokens(long)
  reward.extract_answer(long, ["red", "blue"])
  tok.decode(tok.encode(long[:20_000]))
  report_html.render(*_report_inputs(long, "m"))
  json.dumps(edits.try_edit(scene, long)[1])   # the reason is plain text
