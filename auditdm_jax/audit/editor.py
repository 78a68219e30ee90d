"""Turning the auditor's text into images, and checking its questions.

`Editor` is what the RL loop talks to. It works on batches and on opaque
per-image `context`s, so that an exact world's engine (the scene world's,
`scenes/editor.py`) and a diffusion editor (FLUX.1-Kontext for edits,
FLUX.1-dev for captions) are interchangeable:

  edit(images, commands, contexts)  -> [Rendered]   I_e = E(I, e)
  generate(captions)                -> [Rendered]   I_g = G(C)
  check_question(contexts, questions) -> [(ok, reason)]
  answer_space(contexts, questions) -> [answers or None]  (None: free-form)
  ground_truth(contexts, questions) -> [answer or None]   (None: unknown)

A diffusion backend ignores the contexts, accepts any non-empty command,
question or caption, and knows no ground truth; an exact backend parses and
renders edits and captions, poses only questions its world can answer, gives
each question's answer space (the reward reads answers through it), and
knows the ground truth (used only to *measure* the auditor, never in its
reward). `pipeline/editing.py` picks the editor a config names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np



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


def rejected(reason: str) -> Rendered:
  return Rendered(None, None, False, reason)


class _NoTruth:
  """The question side of an editor on real images: any non-empty question is
  posed, and nothing is known of answers, truth or skills."""

  def check_question(self, contexts, questions) -> list[tuple[bool, str]]:
    return [(bool(q.strip()), "" if q.strip() else "the question is empty")
            for q in questions]

  def answer_space(self, contexts, questions) -> list[tuple[str, ...] | None]:
    return [None for _ in questions]

  def ground_truth(self, contexts, questions) -> list[str | None]:
    return [None for _ in questions]

  def question_skill(self, context, question: str) -> str:
    return ""


class QuestionsOnly(_NoTruth):
  """Real images without an image editor: only the question pairing applies.
  Any non-empty question is posed; nothing is known of the ground truth."""

  WHY = "no image editor is configured (audit.editor='none'): questions only"

  def edit(self, images, commands, contexts) -> list[Rendered]:
    return [rejected(self.WHY) for _ in commands]

  def generate(self, captions) -> list[Rendered]:
    return [rejected(self.WHY) for _ in captions]


class FluxEditor(_NoTruth):
  """The paper's image routes on real images: FLUX.1 Kontext dev edits
  (I_e = E(I, e)) and FLUX.1 dev regenerates from a caption (I_g = G(C)),
  both frozen (`auditdm_jax.diffusion` pipelines, sharded over the run's mesh).

  Any non-empty command or caption is rendered; nothing is known of the
  ground truth. Rows run in fixed batches of `batch` (the last one padded),
  and every edit runs at its input size's resolution bucket
  (`Pipeline.bucket`), so there is one compilation per bucket. Each row's
  initial noise is drawn from a digest of (seed, route, text, image), so a
  row's image does not depend on its batch or on how often the editor ran
  before (a resumed audit renders what the interrupted one would have).
  Outputs are resized to the input image's size (edits) or `image_size`
  (captions), which is what the answerers take.
  """

  def __init__(self, edit_pipe, gen_pipe, *, image_size: int, batch: int = 4,
               steps: int = 28, edit_guidance: float = 2.5, generate_guidance: float = 3.5,
               resolution: int = 1024, auto_resize: bool = True, seed: int = 0):
    if edit_pipe is None and gen_pipe is None:
      raise ValueError("FluxEditor needs an edit pipeline, a generation pipeline or both")
    if edit_pipe is not None and getattr(edit_pipe, "mode", "edit") != "edit":
      raise ValueError("the edit pipeline is not a FLUX.1 Kontext pipeline")
    self.edit_pipe, self.gen_pipe = edit_pipe, gen_pipe
    self.image_size, self.batch = int(image_size), max(1, int(batch))
    self.steps, self.resolution = int(steps), int(resolution)
    self.edit_guidance, self.generate_guidance = float(edit_guidance), float(generate_guidance)
    self.auto_resize, self.seed = bool(auto_resize), int(seed)

  # -- helpers -------------------------------------------------------------------
  def _noise(self, pipe, route: str, text: str, image, h: int, w: int) -> np.ndarray:
    import hashlib  # pylint: disable=import-outside-toplevel
    d = hashlib.sha256(f"{self.seed}|{route}|{text}".encode())
    if image is not None:
      d.update(np.ascontiguousarray(image).tobytes())
    rng = np.random.default_rng(int.from_bytes(d.digest()[:8], "little"))
    return rng.standard_normal((pipe.latent_channels, h, w)).astype(np.float32)

  def _batches(self, rows: list[int]):
    for i in range(0, len(rows), self.batch):
      chunk = rows[i:i + self.batch]
      yield chunk, chunk + [chunk[-1]] * (self.batch - len(chunk))

  @staticmethod
  def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
      return image
    from PIL import Image  # pylint: disable=import-outside-toplevel
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))

  # -- the Editor protocol ---------------------------------------------------------
  def edit(self, images, commands, contexts) -> list[Rendered]:
    if not len(images) == len(commands) == len(contexts):
      raise ValueError(f"got {len(images)} images, {len(commands)} commands and "
                       f"{len(contexts)} contexts")
    out: list[Rendered | None] = [None] * len(commands)
    if self.edit_pipe is None:
      return [rejected("no edit pipeline (audit.editor_ckpt) is configured") for _ in commands]
    live = []
    for i, cmd in enumerate(commands):
      if not isinstance(cmd, str) or not cmd.strip():
        out[i] = rejected("the edit command is empty")
      else:
        live.append(i)
    pipe = self.edit_pipe
    by_size: dict[tuple, list[int]] = {}
    for i in live:
      by_size.setdefault(tuple(np.asarray(images[i]).shape), []).append(i)
    for shape, rows in by_size.items():
      if len(shape) != 3 or shape[-1] != 3:
        for i in rows:
          out[i] = rejected(f"the image has shape {shape}, not [H, W, 3]")
        continue
      bh, bw = pipe.bucket(shape[0], shape[1], self.auto_resize)
      h, w = pipe.latent_grid(bh, bw)
      for chunk, padded in self._batches(rows):
        imgs = np.stack([np.asarray(images[i], np.uint8) for i in padded])
        noise = np.stack([self._noise(pipe, "edit", commands[i], imgs[j], h, w)
                          for j, i in enumerate(padded)])
        res = pipe.edit(imgs, [commands[i].strip() for i in padded], 0, steps=self.steps,
                        guidance=self.edit_guidance, noise=noise, auto_resize=self.auto_resize)
        for j, i in enumerate(chunk):
          out[i] = Rendered(self._resize(res[j], shape[0], shape[1]), None, True, "", "")
    return out  # type: ignore[return-value]

  def generate(self, captions) -> list[Rendered]:
    out: list[Rendered | None] = [None] * len(captions)
    if self.gen_pipe is None:
      return [rejected("no generation pipeline (audit.generator_ckpt) is configured")
              for _ in captions]
    live = []
    for i, cap in enumerate(captions):
      if not isinstance(cap, str) or not cap.strip():
        out[i] = rejected("the caption is empty")
      else:
        live.append(i)
    pipe = self.gen_pipe
    h, w = pipe.latent_grid(self.resolution, self.resolution)
    for chunk, padded in self._batches(live):
      noise = np.stack([self._noise(pipe, "caption", captions[i], None, h, w) for i in padded])
      res = pipe.generate([captions[i].strip() for i in padded], 0, self.resolution,
                          self.resolution, steps=self.steps, guidance=self.generate_guidance,
                          noise=noise)
      for j, i in enumerate(chunk):
        out[i] = Rendered(self._resize(res[j], self.image_size, self.image_size), None, True,
                          "", "")
    return out  # type: ignore[return-value]
