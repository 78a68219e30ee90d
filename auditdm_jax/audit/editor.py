"""Turning the auditor's text into images, and checking its questions.

`Editor` is what the RL loop talks to. It works on batches and on opaque
per-image `context`s, so that the scene engine here and a diffusion editor
(FLUX.1-Kontext for edits, FLUX.1-dev for captions) are interchangeable:

  edit(images, commands, contexts)  -> [Rendered]   I_e = E(I, e)
  generate(captions)                -> [Rendered]   I_g = G(C)
  check_question(contexts, questions) -> [(ok, reason)]
  answer_space(contexts, questions) -> [answers or None]  (None: free-form)
  ground_truth(contexts, questions) -> [answer or None]   (None: unknown)

A diffusion backend ignores the contexts, accepts any non-empty command,
question or caption, and knows no ground truth; the scene backend is exact:
a context is the scene (JSON), edits and captions are parsed and rendered,
questions must be in the world's template language and answerable there
(`parse.answer_question(strict=True)`: questions the models never saw are
ones no model's answer can be trusted on), each question's answer space is
its skill's answers (the reward reads answers through it), and the ground
truth is the world's answer (used only to *measure* the auditor, never in
its reward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from auditdm_jax.scenes import captions as captions_lib
from auditdm_jax.scenes import edits as edits_lib
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes import parse, world
from auditdm_jax.scenes.world import Scene


@dataclasses.dataclass
class Rendered:
  """One produced image, or why there is none."""

  image: np.ndarray | None     # uint8 [H, W, 3]; None when rejected
  context: Any                 # the new image's context (scene JSON), or None
  ok: bool
  reason: str = ""             # why it was rejected ("" when ok)
  factor: str = ""             # the visual factor changed (edits), "" if unknown


class Editor(Protocol):
  def edit(self, images: np.ndarray, commands: Sequence[str],
           contexts: Sequence[Any]) -> list[Rendered]: ...

  def generate(self, captions: Sequence[str]) -> list[Rendered]: ...

  def check_question(self, contexts: Sequence[Any],
                     questions: Sequence[str]) -> list[tuple[bool, str]]: ...

  def answer_space(self, contexts: Sequence[Any],
                   questions: Sequence[str]) -> list[tuple[str, ...] | None]: ...

  def ground_truth(self, contexts: Sequence[Any],
                   questions: Sequence[str]) -> list[str | None]: ...


def _rejected(reason: str) -> Rendered:
  return Rendered(None, None, False, reason)


class SceneEditor:
  """The exact editor of the scene world (contexts are scene JSON strings);
  `strict=False` accepts any wording the parser understands (module doc)."""

  def __init__(self, strict: bool = True):
    self.strict = bool(strict)

  def edit(self, images, commands, contexts) -> list[Rendered]:
    if not len(images) == len(commands) == len(contexts):
      raise ValueError(f"got {len(images)} images, {len(commands)} commands and "
                       f"{len(contexts)} contexts")
    out = []
    for cmd, ctx in zip(commands, contexts):
      scene = Scene.from_json(ctx)
      new, why = edits_lib.try_edit(scene, cmd)
      if new is None:
        out.append(_rejected(why))
        continue
      out.append(Rendered(world.render(new), new.to_json(), True, "",
                          edits_lib.changed_factor(scene, new, cmd)))
    return out

  def generate(self, captions) -> list[Rendered]:
    out = []
    for text in captions:
      scene, why = captions_lib.try_caption(text)
      out.append(_rejected(why) if scene is None else
                 Rendered(world.render(scene), scene.to_json(), True, "", "scene"))
    return out

  def check_question(self, contexts, questions) -> list[tuple[bool, str]]:
    out = []
    for ctx, q in zip(contexts, questions, strict=True):
      ans, why = parse.try_answer(Scene.from_json(ctx), q, strict=self.strict)
      out.append((ans is not None, why))
    return out

  def answer_space(self, contexts, questions) -> list[tuple[str, ...] | None]:
    """The skill's answers of each question (None when it does not parse)."""
    out = []
    for ctx, q in zip(contexts, questions, strict=True):
      ans, _ = parse.try_answer(Scene.from_json(ctx), q) if ctx else (None, "")
      out.append(None if ans is None else gaps_lib.SKILL_ANSWERS[ans.skill])
    return out

  def ground_truth(self, contexts, questions) -> list[str | None]:
    out = []
    for ctx, q in zip(contexts, questions, strict=True):
      ans, _ = parse.try_answer(Scene.from_json(ctx), q)
      out.append(None if ans is None else ans.answer)
    return out

  def question_skill(self, context, question: str) -> str:
    ans, _ = parse.try_answer(Scene.from_json(context), question)
    return "" if ans is None else ans.skill


class QuestionsOnly:
  """Real images without an image editor: only the question pairing applies.
  Any non-empty question is posed; nothing is known of the ground truth."""

  WHY = "no image editor is configured (audit.editor='none'): questions only"

  def edit(self, images, commands, contexts) -> list[Rendered]:
    return [_rejected(self.WHY) for _ in commands]

  def generate(self, captions) -> list[Rendered]:
    return [_rejected(self.WHY) for _ in captions]

  def check_question(self, contexts, questions) -> list[tuple[bool, str]]:
    return [(bool(q.strip()), "" if q.strip() else "the question is empty")
            for q in questions]

  def answer_space(self, contexts, questions) -> list[tuple[str, ...] | None]:
    return [None for _ in questions]

  def ground_truth(self, contexts, questions) -> list[str | None]:
    return [None for _ in questions]

  def question_skill(self, context, question: str) -> str:
    return ""


EDITORS = {"scene": SceneEditor, "none": QuestionsOnly}
# Pairings each editor can produce (a diffusion editor would allow them all).
PAIRINGS = {"scene": None, "none": ("question",)}


def get_editor(name: str) -> Editor:
  if name in EDITORS:
    return EDITORS[name]()
  raise ValueError(f"unknown editor {name!r}; available: {sorted(EDITORS)} (a diffusion "
                   "editor plugs in through the Editor protocol in audit/editor.py)")
