"""The scene world's exact editor (`audit.editor = "scene"`): the `Editor`
protocol of `audit/editor.py` over scenes.

A context is the scene (JSON), edits and captions are parsed and rendered,
questions must be in the world's template language and answerable there
(`parse.answer_question(strict=True)`: questions the models never saw are
ones no model's answer can be trusted on), each question's answer space is
its skill's answers (the reward reads answers through it), and the ground
truth is the world's answer (used only to *measure* the auditor, never in
its reward).
"""

from __future__ import annotations

from auditdm_jax.audit.editor import Rendered, rejected
from auditdm_jax.scenes import captions as captions_lib
from auditdm_jax.scenes import edits as edits_lib
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes import parse, world
from auditdm_jax.scenes.world import Scene


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
        out.append(rejected(why))
        continue
      out.append(Rendered(world.render(new), new.to_json(), True, "",
                          edits_lib.changed_factor(scene, new, cmd)))
    return out

  def generate(self, captions) -> list[Rendered]:
    out = []
    for text in captions:
      scene, why = captions_lib.try_caption(text)
      out.append(rejected(why) if scene is None else
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
