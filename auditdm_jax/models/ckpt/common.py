"""Shared pieces of the checkpoint readers: errors, dtypes, final validation."""

from __future__ import annotations

from typing import Mapping

import flax
import ml_dtypes
import numpy as np

from auditdm_jax.models import vlm
from auditdm_jax.models.config import VLMConfig

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_MAX_LISTED = 12


def listed_problems(problems) -> str:
  """Problems one to a line: the first `_MAX_LISTED` and a count of the rest."""
  more = len(problems) - _MAX_LISTED
  listed = "\n  ".join(problems[:_MAX_LISTED])
  return f"\n  {listed}" + (f"\n  ... and {more} more" if more > 0 else "")


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not fit the model."""


def as_dtype(name: str | np.dtype) -> np.dtype:
  """np.dtype of 'float32' / 'bfloat16' (or 'bf16') / a dtype."""
  if str(name) in ("bfloat16", "bf16"):
    return BFLOAT16
  return np.dtype(name)


def adjust_vocab_rows(emb: np.ndarray, vocab_size: int) -> np.ndarray:
  """Truncates or zero-pads embedding rows [V', D] to [vocab_size, D].

  Checkpoints differ in padding (big_vision 257152, Hugging Face 257216 for
  PaliGemma 2; 256128 in some Gemma releases); rows beyond the tokenizer's
  vocabulary are never produced by it, so truncation loses nothing and the
  padded rows are zeros (logit 0 for tokens no tokenizer emits).
  """
  rows = emb.shape[0]
  if rows == vocab_size:
    return emb
  if rows > vocab_size:
    return emb[:vocab_size]
  pad = np.zeros((vocab_size - rows,) + emb.shape[1:], emb.dtype)
  return np.concatenate([np.asarray(emb), pad], axis=0)


def assemble(flat: Mapping[str, np.ndarray], cfg: VLMConfig, source: str) -> dict:
  """Checks `flat` ('/'-joined keys) against the config and nests it.

  Every missing key, unexpected key and shape mismatch is reported, naming the
  file, the key and both shapes. Arrays are cast to the config's param dtype.
  """
  expected = vlm.flat_shapes(cfg)
  problems = []
  for key in sorted(set(expected) - set(flat)):
    problems.append(f"missing key {key!r} (the config expects shape {expected[key]})")
  for key in sorted(set(flat) - set(expected)):
    problems.append(f"unexpected key {key!r} with shape {tuple(np.shape(flat[key]))}")
  for key in sorted(set(flat) & set(expected)):
    got = tuple(np.shape(flat[key]))
    if got != expected[key]:
      problems.append(f"key {key!r} has shape {got} in the file but the config "
                      f"expects {expected[key]}")
  if problems:
    raise CheckpointError(f"checkpoint {source} does not fit the model config "
                          f"({cfg.variant}):{listed_problems(problems)}")
  dtype = as_dtype(cfg.text.param_dtype)
  out = {}
  for key, arr in flat.items():
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != BFLOAT16:
      raise CheckpointError(f"checkpoint {source}: key {key!r} has non-float "
                            f"dtype {arr.dtype}")
    if not np.all(np.isfinite(arr.astype(np.float32))):
      raise CheckpointError(f"checkpoint {source}: key {key!r} holds NaN or Inf")
    out[key] = arr.astype(dtype)
  return flax.traverse_util.unflatten_dict(out, sep="/")


def flatten(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(params, sep="/").items()}


def require(flat: Mapping[str, np.ndarray], key: str, source: str, ndim: int):
  if key not in flat:
    raise CheckpointError(f"checkpoint {source}: missing key {key!r}")
  arr = flat[key]
  if np.ndim(arr) != ndim:
    raise CheckpointError(f"checkpoint {source}: key {key!r} has shape "
                          f"{tuple(np.shape(arr))}, expected {ndim} dimensions")
  return arr
