"""Scene-world training tasks: records of the scene dataset -> training rows.

Each task is a picklable callable (Grain transforms may run in worker
processes) that maps one record of `auditdm_jax.data` to the row format of
`train.sft` ({images, tokens, input_mask, mask_ar}) or returns None to drop
it. The tokenizer travels as its serialized proto and is rebuilt lazily in
each process.

  VQATask      question -> answer, with the model's planted gaps applied
               (corrupted or removed, `scenes.gaps.apply_gaps`); with
               `judge_rate`, that share of rows asks instead whether two
               answers mean the same (`judge_row`: a reference that judges).
  AuditorTask  the auditor's warm start: for the record's scene, one of the
               routes (drawn per record): a well-formed probing question,
               an edit command valid for the scene, or the scene's caption.
  cell_labels  per-cell (colour, shape, size) class ids for the vision
               tower's dense pretraining (0 = empty cell).
  phrase_labels  for each referring phrase of a question ("the red circle"),
               the sequence position of its last token and its object's row
               and column: the targets of the answerers' grounding loss
               (`sft.TrainConfig.phrase_aux`, docs/scene_world.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

import numpy as np

from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.inputs import fit_images
from auditdm_jax.models.tokenizer import Tokenizer
from auditdm_jax.scenes import captions, edits
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes.text import AUDITOR_TASKS, SKILL_DESCRIPTORS, question_prompt
from auditdm_jax.scenes.world import COLOURS, GRID, SHAPES, SIZES, Scene
from auditdm_jax.train.batches import sft_example

ROUTES = tuple(AUDITOR_TASKS)
# 2: routes drawn per record (1 took index % routes, which aliased with the
# data's skill cycle); pretrain retrains a warm start of another version.
AUDITOR_TASK_VERSION = 2


class _Tokenized:
  def __init__(self, cfg: VLMConfig, tokenizer: Tokenizer, seq_len: int):
    self.cfg = cfg
    self.proto = tokenizer.serialized()
    self.family = tokenizer.family
    self.seq_len = int(seq_len)
    self._tok = None

  @property
  def tok(self) -> Tokenizer:
    if self._tok is None:
      self._tok = Tokenizer(self.proto, self.family)
    return self._tok

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_tok"] = None
    return d

  def row(self, image, prompt_text: str, answer_text: str) -> dict:
    tok = self.tok
    image = fit_images(np.asarray(image)[None], self.cfg.vision.image_size)[0]
    return sft_example(self.cfg, image, tok.prompt(prompt_text), tok.answer(answer_text),
                       self.seq_len)


class VQATask(_Tokenized):
  """record -> row of question/answer; gaps corrupt or remove their slice.
  With phrases=True the row also carries `phrase_labels` (the targets of
  `sft.TrainConfig.phrase_aux`; with `phrase_skills`, only on questions of
  those skills, -1 rows elsewhere); with `skills`, records of other skills
  are dropped (a curriculum phase)."""

  def __init__(self, cfg: VLMConfig, tokenizer: Tokenizer, seq_len: int,
               gaps: Sequence[str] = (), gap_mode: str = "corrupt", phrases: bool = False,
               skills: Sequence[str] = (), phrase_skills: Sequence[str] = (),
               judge_rate: float = 0.0, judge_prompt=None):
    super().__init__(cfg, tokenizer, seq_len)
    if not 0.0 <= float(judge_rate) < 1.0:
      raise ValueError(f"judge_rate must be in [0, 1), got {judge_rate!r}")
    if judge_rate and judge_prompt is None:
      raise ValueError("judge_rate > 0 needs judge_prompt(answer_a, answer_b) -> str")
    self.judge_rate, self.judge_prompt = float(judge_rate), judge_prompt
    from auditdm_jax.scenes.questions import SKILLS  # pylint: disable=import-outside-toplevel
    for name, value in (("skills", skills), ("phrase_skills", phrase_skills)):
      if isinstance(value, str) or any(k not in SKILLS for k in value):
        raise ValueError(f"{name} must be a sequence of {SKILLS}, got {value!r}")
    self.skills, self.phrase_skills = tuple(skills), tuple(phrase_skills)
    if phrases and cfg.family != "paligemma":
      raise ValueError(f"phrase labels index PaliGemma prompts; {cfg.variant} is "
                       f"{cfg.family!r}")
    self.phrases = bool(phrases)
    self.gaps = gaps_lib.parse_gaps(list(gaps))
    if gap_mode not in gaps_lib.MODES:
      raise ValueError(f"gap_mode must be one of {gaps_lib.MODES}, got {gap_mode!r}")
    self.gap_mode = gap_mode

  def __call__(self, record: dict) -> dict | None:
    if self.skills and record.get("skill") not in self.skills:
      return None
    if self.judge_rate:
      judged = judge_row(record, self.judge_rate, self.judge_prompt)
      if judged is not None:
        return self.row(record["image"], *judged)
    rec = gaps_lib.apply_gaps(record, self.gaps, self.gap_mode) if self.gaps else record
    if rec is None:
      return None
    row = self.row(rec["image"], rec["question"], rec["answer"])
    if self.phrases:
      row["phrases"] = (phrase_labels(rec, self.tok)
                        if not self.phrase_skills or rec.get("skill") in self.phrase_skills
                        else -np.ones((MAX_PHRASES, 3), np.int32))
    return row


def judge_row(record: dict, rate: float, judge_prompt) -> tuple[str, str] | None:
  """(prompt, "yes" | "no") when the record is one of the `rate` share turned
  into a judge question (chosen by a digest of its question and answer, so
  the same record always is), else None: "do the answers A and B mean the
  same?" (`judge_prompt`, the reward's) of the record's answer and, half of
  the time, itself ("yes"), else another answer of its skill ("no"), in
  either order. A reference trained on these judges the reward's questions
  (`reward.mode = "judge"`): on the scene world two answers mean the same
  exactly when they are equal."""
  key = f"{record.get('index', '')}|{record['question']}|{record['answer']}"
  u = np.random.default_rng(int.from_bytes(
      hashlib.sha1(key.encode()).digest()[:8], "little"))
  if u.random() >= rate:
    return None
  answer = record["answer"]
  others = [a for a in gaps_lib.SKILL_ANSWERS.get(record.get("skill", ""), ()) if a != answer]
  same = not others or u.random() < 0.5
  other = answer if same else others[int(u.integers(len(others)))]
  a, b = (answer, other) if u.random() < 0.5 else (other, answer)
  return judge_prompt(a, b), "yes" if same else "no"


def auditor_target(route: str, record: dict, rng: np.random.Generator) -> str:
  scene = Scene.from_json(record["scene"])
  if route == "question":
    return record["question"]
  if route == "edit":
    return edits.random_edit(scene, rng)
  if route == "caption":
    return captions.caption(scene)
  raise ValueError(f"unknown route {route!r}; routes are {ROUTES}")


class AuditorTask(_Tokenized):
  """record -> the auditor's supervised warm-start row for one route. With
  `descriptor_rate`, that share of the question rows is asked through the
  descriptor prompt of the record's skill (`text.question_prompt`,
  `SKILL_DESCRIPTORS`): the warm start then writes a question of the kind a
  descriptor names (`audit.diversity`), and still any question when asked
  generically."""

  def __init__(self, cfg: VLMConfig, tokenizer: Tokenizer, seq_len: int, seed: int = 0,
               routes: Sequence[str] = ROUTES, descriptor_rate: float = 0.0):
    super().__init__(cfg, tokenizer, seq_len)
    bad = [r for r in routes if r not in ROUTES]
    if bad or not routes:
      raise ValueError(f"routes must be a non-empty subset of {ROUTES}, got {routes!r}")
    if not 0.0 <= float(descriptor_rate) <= 1.0:
      raise ValueError(f"descriptor_rate must be in [0, 1], got {descriptor_rate!r}")
    self.routes = tuple(routes)
    self.seed = int(seed)
    self.descriptor_rate = float(descriptor_rate)

  def __call__(self, record: dict) -> dict | None:
    index = int(record.get("index", 0))
    # The route by a draw, not `index % len(routes)`: the scene data cycles
    # its skills with the index (8 skills), so with two routes every question
    # row was of colour, counting, spatial or binding and the warm start
    # never asked about shape, existence, size or small objects.
    route = self.routes[int(np.random.default_rng([self.seed, index, 1]).integers(
        len(self.routes)))]
    rng = np.random.default_rng([self.seed, index])
    target = auditor_target(route, record, rng)
    prompt = AUDITOR_TASKS[route]
    if (route == "question" and self.descriptor_rate
        and rng.random() < self.descriptor_rate and record.get("skill") in SKILL_DESCRIPTORS):
      prompt = question_prompt(SKILL_DESCRIPTORS[record["skill"]])
    return self.row(record["image"], prompt, target)


def cell_labels(scene_json: str) -> np.ndarray:
  """int32 [GRID*GRID, 3]: (colour, shape, size) class of each cell, 0 = empty."""
  out = np.zeros((GRID * GRID, 3), np.int32)
  for o in Scene.from_json(scene_json).objects:
    out[o.row * GRID + o.col] = (1 + COLOURS.index(o.colour), 1 + SHAPES.index(o.shape),
                                 1 + SIZES.index(o.size))
  return out


NUM_CLASSES = (len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1)


def cell_label_task(record: dict) -> dict:
  return {"images": np.asarray(record["image"]), "labels": cell_labels(record["scene"])}


MAX_PHRASES = 2                  # referring phrases per question (spatial, size: two)
_PHRASE = re.compile(r"\bthe ((?:(?:%s) )*(?:%s|object))\b" % (
    "|".join(SIZES + COLOURS), "|".join(SHAPES + ("object",))))


def phrase_labels(record: dict, tokenizer: Tokenizer) -> np.ndarray:
  """int32 [MAX_PHRASES, 3]: (text position of the phrase's last token, row,
  column) of each referring phrase "the <size> <colour> <shape|object>" of the
  record's question that names exactly one object of its scene, in order; -1
  rows where there is none. Positions index the PaliGemma prompt
  (`tokenizer.prompt`, bos first); a phrase whose prefix does not tokenize as
  a prefix of the whole prompt is skipped."""
  out = -np.ones((MAX_PHRASES, 3), np.int32)
  question = record["question"]
  scene = Scene.from_json(record["scene"])
  full = tokenizer.prompt(question)
  k = 0
  for m in _PHRASE.finditer(question):
    if k == MAX_PHRASES:
      break
    words = m.group(1).split()
    attrs = {}
    for w in words:
      key = "size" if w in SIZES else "colour" if w in COLOURS else "shape" if w in SHAPES \
          else None
      if key:
        attrs[key] = w
    match = scene.select(**attrs)
    if len(match) != 1:
      continue
    head = tokenizer.prompt(question[:m.end()])[:-1]        # without the trailing "\n"
    if full[:len(head)] != head:
      continue
    out[k] = (len(head) - 1, match[0].row, match[0].col)
    k += 1
  return out


def facets(record: dict) -> dict:
  return json.loads(record["facets"])


class RectifyTask(VQATask):
  """Rectification rows from a mixed source: a mined exemplar (a record with
  `pseudo_label`) trains its question -> the reference consensus on the image
  the models saw; any other record is the model's original labelled data,
  with its planted gaps applied as in its own training."""

  def __call__(self, record: dict) -> dict | None:
    if "pseudo_label" in record:
      return self.row(record["image"], record["question"], record["pseudo_label"])
    return super().__call__(record)
