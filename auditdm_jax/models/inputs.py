"""Model inputs: checks and padding of images and token rows, prompt heads
(Gemma 3's image block expanded), length buckets and stop ids, shared by the
handle, the sampler and the trainers (numpy, no model code)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.gemma3 import expand_image_tokens
from auditdm_jax.models.tokenizer import Tokenizer


LENGTH_BUCKET = 16


def bucket_length(n: int, bucket: int = LENGTH_BUCKET) -> int:
  return max(bucket, -(-n // bucket) * bucket)


def check_images(cfg: VLMConfig, images, batch: int) -> np.ndarray:
  s = cfg.vision.image_size
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {images.dtype}")
  if images.shape != (batch, s, s, 3):
    raise ValueError(f"images must have shape ({batch}, {s}, {s}, 3) for this "
                     f"model and batch, got {images.shape}")
  return images


def fit_images(images, size: int) -> np.ndarray:
  """uint8 [B, H, W, 3] -> [B, size, size, 3] (bilinear; unchanged when it
  already fits): one image shown to models of different resolutions."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:3] == (size, size):
    return images
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                   for im in images.astype(np.uint8)])


def check_rows(cfg: VLMConfig, rows, name: str, allow_empty: bool) -> list[list[int]]:
  if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
    raise TypeError(f"{name} must be a list of token-id lists")
  vocab = cfg.text.vocab_size
  out = []
  for i, row in enumerate(rows):
    if isinstance(row, (str, bytes)):
      raise TypeError(f"{name}[{i}] is a string; pass token ids (use the tokenizer)")
    row = [int(t) for t in row]
    if not row and not allow_empty:
      raise ValueError(f"{name}[{i}] is empty")
    bad = [t for t in row if not 0 <= t < vocab and t != cfg.boi_id]
    if bad:
      raise ValueError(f"{name}[{i}] holds token ids outside [0, {vocab}): {bad[:5]}")
    out.append(row)
  if not out:
    raise ValueError(f"{name} is empty")
  return out


def prompt_heads(cfg: VLMConfig, prompts) -> list[list[int]]:
  """Per row, the text tokens that precede the answer (Gemma 3: expanded)."""
  if cfg.family == "gemma3":
    return [expand_image_tokens(p, cfg) for p in prompts]
  return [list(p) for p in prompts]


def pad_rows(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-aligned int32 [B, length] token array (zero padded) and row lengths."""
  tokens = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return tokens, np.asarray([len(r) for r in rows], np.int32)


def score_batch(cfg: VLMConfig, prompts, answers, bucket: int = LENGTH_BUCKET):
  """Validated, padded (tokens, input_mask, mask_ar) and per-row answer spans."""
  prompts = check_rows(cfg, prompts, "prompts", allow_empty=cfg.family == "paligemma")
  answers = check_rows(cfg, answers, "answers", allow_empty=False)
  if len(prompts) != len(answers):
    raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
  heads = prompt_heads(cfg, prompts)
  seqs = [h + a for h, a in zip(heads, answers)]
  t = bucket_length(max(len(s) for s in seqs), bucket)
  b = len(seqs)
  tokens = np.zeros((b, t), np.int32)
  input_mask = np.zeros((b, t), np.bool_)
  mask_ar = np.zeros((b, t), np.int32)
  for i, (h, s) in enumerate(zip(heads, seqs)):
    tokens[i, :len(s)] = s
    input_mask[i, :len(s)] = True
    mask_ar[i, len(h):len(s)] = 1
  spans = [(len(h), len(a)) for h, a in zip(heads, answers)]
  return tokens, input_mask, mask_ar, spans


def default_stop_ids(cfg: VLMConfig, tokenizer: Tokenizer | None) -> list[int]:
  """EOS, plus <end_of_turn> for Gemma 3 when the tokenizer has it."""
  stops = [cfg.eos_id]
  if tokenizer is not None and cfg.family == "gemma3":
    eot = tokenizer.piece_id("<end_of_turn>")
    if eot is not None:
      stops.append(eot)
  return stops
