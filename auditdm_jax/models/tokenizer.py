"""SentencePiece tokenizer with the special tokens of PaliGemma and Gemma 3.

Special tokens are looked up by their piece strings, so the same wrapper serves
the real tokenizers (PaliGemma: 257152 pieces with <loc0000>..<loc1023> and
<seg000>..<seg127>; Gemma 3: <start_of_image>, <end_of_image>,
<start_of_turn>, <end_of_turn>) and the tiny ones trained in-process for the
CPU world (`train_sentencepiece`).

Prompt conventions (see docs/architecture.md):
  PaliGemma prompt  = [BOS] + enc(prefix) + enc("\\n")     (the prefix; the
                      image tokens come before it inside the model)
  PaliGemma answer  = enc(suffix) + [EOS]
  Gemma 3 prompt    = [BOS] + "<start_of_turn>user\\n" + <start_of_image> +
                      enc(text) + "<end_of_turn>\\n<start_of_turn>model\\n"
  Gemma 3 answer    = enc(text) + [<end_of_turn> or EOS]
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm

from auditdm_jax.utils.fileio import atomic_write

FAMILIES = ("paligemma", "gemma3")
GEMMA3_SPECIALS = ("<start_of_image>", "<end_of_image>", "<start_of_turn>",
                   "<end_of_turn>")


class Tokenizer:
  """A sentencepiece model plus the family's special-token ids."""

  def __init__(self, model: str | bytes, family: str = "paligemma"):
    if family not in FAMILIES:
      raise ValueError(f"tokenizer family must be one of {FAMILIES}, got {family!r}")
    self.family = family
    self.sp = spm.SentencePieceProcessor()
    try:
      if isinstance(model, bytes):
        self.sp.LoadFromSerializedProto(model)
        self._proto = model
      else:
        if not os.path.isfile(model):
          raise FileNotFoundError(model)
        self.sp.Load(model)
        with open(model, "rb") as f:
          self._proto = f.read()
    except FileNotFoundError as e:
      raise ValueError(f"tokenizer model {model!r} does not exist") from e
    except (OSError, RuntimeError) as e:
      name = "<bytes>" if isinstance(model, bytes) else model
      raise ValueError(f"tokenizer model {name}: not a sentencepiece model ({e})") from e

  # -- basic ------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self.sp.GetPieceSize()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self.sp.pad_id()

  def piece_id(self, piece: str) -> int | None:
    """Id of an exact piece, or None if the vocabulary lacks it."""
    i = self.sp.PieceToId(piece)
    return i if self.sp.IdToPiece(i) == piece else None

  def special_id(self, piece: str) -> int:
    i = self.piece_id(piece)
    if i is None:
      raise ValueError(f"this {self.family} tokenizer has no {piece!r} token")
    return i

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    ids = list(self.sp.EncodeAsIds(text))
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
    out = []
    for i in ids:
      i = int(i)
      if stop_at_eos and i == self.eos_id:
        break
      if 0 <= i < self.vocab_size:
        out.append(i)
    return self.sp.DecodeIds(out)

  def serialized(self) -> bytes:
    return self._proto

  def save(self, path: str) -> None:
    with atomic_write(path) as f:
      f.write(self._proto)

  # -- PaliGemma -------------------------------------------------------------
  def loc_id(self, i: int) -> int:
    return self.special_id(f"<loc{i:04d}>")

  def seg_id(self, i: int) -> int:
    return self.special_id(f"<seg{i:03d}>")

  def paligemma_prompt(self, prefix: str) -> list[int]:
    return self.encode(prefix, add_bos=True) + self.encode("\n")

  def paligemma_answer(self, suffix: str) -> list[int]:
    return self.encode(suffix, add_eos=True)

  # -- Gemma 3 ---------------------------------------------------------------
  @property
  def boi_id(self) -> int:
    return self.special_id("<start_of_image>")

  @property
  def eoi_id(self) -> int:
    return self.special_id("<end_of_image>")

  @property
  def end_of_turn_id(self) -> int:
    return self.special_id("<end_of_turn>")

  def gemma3_prompt(self, text: str, with_image: bool = True, chat: bool = True) -> list[int]:
    ids = [self.bos_id]
    if chat:
      ids += [self.special_id("<start_of_turn>")] + self.encode("user\n")
    if with_image:
      ids += [self.boi_id]
    ids += self._plain(text)
    if chat:
      ids += [self.end_of_turn_id] + self.encode("\n") + \
          [self.special_id("<start_of_turn>")] + self.encode("model\n")
    return ids

  def gemma3_answer(self, text: str, chat: bool = True) -> list[int]:
    return self._plain(text) + [self.end_of_turn_id if chat else self.eos_id]

  def _plain(self, text: str) -> list[int]:
    """Ids of text that may be model-written: a literal "<start_of_image>" /
    "<end_of_image>" in it is dropped, since only the model places those."""
    drop = {self.boi_id, self.eoi_id}
    return [t for t in self.encode(text) if t not in drop]

  # -- generic ---------------------------------------------------------------
  def prompt(self, text: str) -> list[int]:
    return self.paligemma_prompt(text) if self.family == "paligemma" else self.gemma3_prompt(text)

  def answer(self, text: str) -> list[int]:
    return self.paligemma_answer(text) if self.family == "paligemma" else self.gemma3_answer(text)


def train_sentencepiece(texts: Sequence[str], vocab_size: int, family: str = "paligemma",
                        extra_symbols: Sequence[str] = (), num_loc: int = 0,
                        num_seg: int = 0, byte_fallback: bool = False,
                        model_type: str = "unigram") -> Tokenizer:
  """Trains a small sentencepiece model in-process (no files) for tests and the
  CPU world. Ids: 0 pad, 1 eos, 2 bos, 3 unk (the Gemma convention); the
  family's special tokens and `extra_symbols` are user-defined pieces; "\\n"
  survives (identity normalisation, no dummy prefix, as in Gemma). With byte_fallback, unseen characters
  become byte pieces instead of <unk> (needs vocab_size > 256 + characters).
  model_type "bpe" keeps whole words as pieces on small closed-vocabulary
  corpora (the scene world), where "unigram" splits them."""
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  symbols = ["\n", "\n\n"]
  if family == "gemma3":
    symbols += list(GEMMA3_SPECIALS)
  symbols += [f"<loc{i:04d}>" for i in range(num_loc)]
  symbols += [f"<seg{i:03d}>" for i in range(num_seg)]
  symbols += [s for s in extra_symbols if s not in symbols]
  model = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      user_defined_symbols=symbols, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False,
      byte_fallback=byte_fallback, hard_vocab_limit=False,
      character_coverage=1.0, split_digits=True, minloglevel=2)
  return Tokenizer(model.getvalue(), family)
