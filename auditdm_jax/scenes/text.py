"""The world's text: the tokenizer corpus and the shared tokenizer.

All models of the scene world share one sentencepiece model trained in-process
on a deterministic corpus of the world's questions, answers, edit commands and
captions. Its first ids are fixed (0 pad, 1 eos, 2 bos, 3 unk, then "\\n",
"\\n\\n", <start_of_image>, <end_of_image>, <start_of_turn>, <end_of_turn>),
so the scene presets can name the Gemma 3 image ids as constants.
"""

from __future__ import annotations

import functools

import numpy as np

from auditdm_jax.models.tokenizer import Tokenizer, train_sentencepiece
from auditdm_jax.scenes import questions as Q
from auditdm_jax.scenes.world import (
  COL_NAMES,
  COLOURS,
  ROW_NAMES,
  SHAPES,
  SIZES,
)

VOCAB_SIZE = 512          # the scene presets' embedding rows (>= the tokenizer's)
BOI_ID, EOI_ID = 6, 7     # <start_of_image>, <end_of_image> in the world tokenizer
AUDITOR_TASKS = {
    "question": "ask a question about the image",
    "edit": "write an edit command for the image",
    "caption": "describe the image",
}
# A question prompt that names a kind of question (a descriptor, as the paper
# names failure types): `audit.diversity` asks the auditor through it, and
# the auditor's warm start learns it on the world's questions, each skill
# named by its descriptor below (the stand-in for a real MLLM that reads
# "ask a question about counting"). Words of the corpus only: the tokenizer
# stays as it was.
DESCRIBED_QUESTION = "ask a question about {descriptor}"
SKILL_DESCRIPTORS = {
    "colour": "colour", "shape": "shape", "counting": "counting",
    "existence": "existence", "spatial": "position", "size": "size",
    "binding": "binding", "small_object": "small objects",
}
assert tuple(SKILL_DESCRIPTORS) == Q.SKILLS


def question_prompt(descriptor: str = "", template: str = DESCRIBED_QUESTION) -> str:
  """The auditor's question prompt: the generic one, or `template` naming
  `descriptor`."""
  if not descriptor:
    return AUDITOR_TASKS["question"]
  return template.format(descriptor=descriptor)


def cell_name(row: int, col: int) -> str:
  return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


def corpus(n: int = 3000, seed: int = 1234) -> list[str]:
  """Deterministic sample of every kind of text the world produces."""
  rng = np.random.default_rng(seed)
  lines = list(Q.ANSWER_WORDS) + list(AUDITOR_TASKS.values()) + ["user\n", "model\n"] * 50
  for i in range(n):
    skill = Q.SKILLS[i % len(Q.SKILLS)]
    scene, q = Q.scene_for_skill(skill, rng)
    lines.append(q.text + " " + q.answer)
    o = scene.objects[rng.integers(len(scene))]
    ref = Q.phrase(o.size, o.colour, o.shape)
    r, c = int(rng.integers(3)), int(rng.integers(3))
    lines += [
        f"recolour the {ref} to {COLOURS[rng.integers(len(COLOURS))]}",
        f"reshape the {ref} into a {SHAPES[rng.integers(len(SHAPES))]}",
        f"resize the {ref} to {SIZES[rng.integers(len(SIZES))]}",
        f"move the {ref} to the {cell_name(r, c)}",
        f"add a {ref} at the {cell_name(r, c)}",
        f"remove the {ref}",
        " and ".join(f"a {p.size} {p.colour} {p.shape} at the {cell_name(p.row, p.col)}"
                     for p in scene.objects),
    ]
  return lines


@functools.lru_cache(maxsize=2)
def _proto() -> bytes:
  tok = train_sentencepiece(corpus(), vocab_size=VOCAB_SIZE - 64, family="gemma3",
                            model_type="bpe")
  return tok.serialized()


def world_tokenizer(family: str = "paligemma") -> Tokenizer:
  """The world's tokenizer, as a `family` tokenizer (same pieces and ids)."""
  tok = Tokenizer(_proto(), family)
  if tok.boi_id != BOI_ID or tok.eoi_id != EOI_ID:
    raise RuntimeError(f"world tokenizer image ids moved: {tok.boi_id}, {tok.eoi_id}")
  if tok.vocab_size > VOCAB_SIZE:
    raise RuntimeError(f"world tokenizer has {tok.vocab_size} pieces > {VOCAB_SIZE}")
  return tok
