"""Training batches of the VLMs: token rows from (image, prompt, answer) ids, and
the checks a batch passes before a step (the keys: `train/sft.py`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.inputs import check_images, check_rows, prompt_heads


BATCH_KEYS = ("images", "tokens", "input_mask", "mask_ar")

def sft_example(cfg: VLMConfig, image, prompt: Sequence[int], answer: Sequence[int],
                seq_len: int) -> dict[str, np.ndarray]:
  """One training row (no batch axis) padded to seq_len text tokens.

  PaliGemma: prompt = the text after the image tokens (BOS ... "\\n"); Gemma 3:
  the prompt holds one <start_of_image>, expanded here. The answer should end
  with EOS (or <end_of_turn>) for the model to learn to stop.
  """
  prompt = check_rows(cfg, [prompt], "prompt", allow_empty=cfg.family == "paligemma")[0]
  answer = check_rows(cfg, [answer], "answer", allow_empty=False)[0]
  head = prompt_heads(cfg, [prompt])[0]
  seq = head + answer
  if len(seq) > seq_len:
    raise ValueError(f"prompt + answer hold {len(seq)} tokens (after image expansion), "
                     f"more than seq_len={seq_len}")
  image = check_images(cfg, np.asarray(image)[None], 1)[0]
  tokens = np.zeros((seq_len,), np.int32)
  tokens[:len(seq)] = seq
  input_mask = np.arange(seq_len) < len(seq)
  mask_ar = ((np.arange(seq_len) >= len(head)) & input_mask).astype(np.int32)
  return {"images": image, "tokens": tokens, "input_mask": input_mask, "mask_ar": mask_ar}


def sft_batch(cfg: VLMConfig, images, prompts, answers, seq_len: int
              ) -> dict[str, np.ndarray]:
  """`sft_example` rows stacked into one batch."""
  if not len(images) == len(prompts) == len(answers):
    raise ValueError(f"got {len(images)} images, {len(prompts)} prompts and "
                     f"{len(answers)} answers")
  rows = [sft_example(cfg, i, p, a, seq_len) for i, p, a in zip(images, prompts, answers)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def check_batch(cfg: VLMConfig, batch, grad_accum: int = 1) -> dict[str, np.ndarray]:
  """The model inputs of one data batch as numpy arrays, validated."""
  if not isinstance(batch, Mapping):
    raise TypeError(f"a training batch must be a dict of arrays, got {type(batch).__name__}")
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"training batch lacks {missing}; it has {sorted(batch)} "
                     f"(needed: {list(BATCH_KEYS)}, optional 'loss_mask')")
  tokens = np.asarray(batch["tokens"])
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"batch['tokens'] must be an int [B, T] array, got "
                     f"{tokens.dtype} {tokens.shape}")
  b, t = tokens.shape
  images = check_images(cfg, batch["images"], b)
  out = {"images": images, "tokens": tokens.astype(np.int32)}
  for k, dtype in (("input_mask", np.bool_), ("mask_ar", np.int32), ("loss_mask", np.bool_)):
    if k not in batch:
      continue
    a = np.asarray(batch[k])
    if a.shape != (b, t):
      raise ValueError(f"batch[{k!r}] has shape {a.shape}, tokens have {(b, t)}")
    out[k] = a.astype(dtype)
  if "phrases" in batch:
    ph = np.asarray(batch["phrases"])
    if ph.ndim != 3 or ph.shape[0] != b or ph.shape[2] != 3 \
        or not np.issubdtype(ph.dtype, np.integer):
      raise ValueError(f"batch['phrases'] must be an int [B={b}, P, 3] array of (position, "
                       f"row, column), got {ph.dtype} {ph.shape}")
    if ph[..., 0].max(initial=-1) >= t:
      raise ValueError(f"batch['phrases'] holds a position >= the {t} text tokens")
    out["phrases"] = ph.astype(np.int32)
  allowed = out["tokens"][out["input_mask"]]
  if cfg.image_token_id is not None:
    allowed = allowed[allowed != cfg.image_token_id]
  if allowed.size and (allowed.min() < 0 or allowed.max() >= cfg.text.vocab_size):
    raise ValueError(f"batch['tokens'] holds ids outside [0, {cfg.text.vocab_size})")
  if b % grad_accum:
    raise ValueError(f"batch size {b} is not divisible by TrainConfig.grad_accum="
                     f"{grad_accum}")
  return out


def loss_positions(batch: Mapping[str, np.ndarray], slots: int) -> np.ndarray:
  """int32 [B, slots]: each row's loss-token positions (`loss.loss_mask`: the
  answer tokens, or `loss_mask`) in order, -1 where a row has fewer. Raises
  when a row has more loss tokens than `slots` (it would lose some)."""
  mask = np.asarray(batch["input_mask"], bool)
  if "loss_mask" in batch:
    mask = mask & np.asarray(batch["loss_mask"], bool)
  else:
    mask = mask & (np.asarray(batch["mask_ar"]) != 0)
  counts = mask.sum(1)
  if counts.size and counts.max() > slots:
    row = int(np.argmax(counts))
    raise ValueError(f"row {row} of the batch has {int(counts[row])} loss tokens, more than "
                     f"TrainConfig.loss_slots={slots}; raise loss_slots or set it to 0")
  order = np.argsort(~mask, axis=1, kind="stable")[:, :slots]
  if order.shape[1] < slots:                    # rows shorter than the slots
    order = np.pad(order, ((0, 0), (0, slots - order.shape[1])))
  return np.where(np.arange(slots)[None, :] < counts[:, None], order, -1).astype(np.int32)
