"""Shared pieces of the checkpoint readers: errors, dtypes, final validation."""

from __future__ import annotations

from typing import Any, Mapping

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


def misfit(source: str, problems, config: str = "") -> CheckpointError:
  """The error of a checkpoint that does not fit the model config: every
  problem listed (`listed_problems`), `config` naming the config if given."""
  named = f" ({config})" if config else ""
  return CheckpointError(f"checkpoint {source} does not fit the model config{named}:"
                         f"{listed_problems(problems)}")


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
    raise misfit(source, problems, cfg.variant)
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


class Taker:
  """Takes tensors out of a state dict by name, checking shapes.

  `take(key, shape)` returns the array cast to `dtype` (float32 through
  float32 so bfloat16 files cast exactly; float and finite checked); every
  problem is collected and raised together by `finish()`, naming the source,
  the key and the shapes. `finish()` also reports every key that was never
  taken as unknown.

  With `dtype=None` arrays come back as stored and unchecked (the caller
  checks them, as `assemble` does); with `strict_now=True` a missing key
  raises at once. `stack(fmt, n, fn)` takes `fmt.format(i)` for i < n, `fn`
  applied to each, stacked; `unused()` lists the keys not taken.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str,
               dtype: Any = np.float32, prefix: str = "", strict_now: bool = False):
    self.tensors = tensors
    self.source = source
    self.dtype = None if dtype is None else as_dtype(dtype)
    self.prefix = prefix
    self.strict_now = strict_now
    self.used: set[str] = set()
    self.problems: list[str] = []

  def has(self, key: str) -> bool:
    return self.prefix + key in self.tensors

  def __call__(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    return self.take(key, shape)

  def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    full = self.prefix + key
    if full not in self.tensors:
      if self.strict_now:
        raise CheckpointError(f"checkpoint {self.source}: missing tensor {full!r}")
      self.problems.append(f"missing key {full!r}"
                           + (f" (expected shape {tuple(shape)})" if shape is not None else ""))
      return np.zeros(shape or (), self.dtype)
    self.used.add(full)
    arr = self.tensors[full]
    got = tuple(np.shape(arr))
    if shape is not None and got != tuple(shape):
      where = getattr(self.tensors, "file_of", lambda k: "?")(full)
      self.problems.append(f"key {full!r} has shape {got} in {where} but the config "
                           f"expects {tuple(shape)}")
      return np.zeros(shape, self.dtype)
    arr = np.asarray(arr)
    if self.dtype is None:
      return arr
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == BFLOAT16):
      self.problems.append(f"key {full!r} has non-float dtype {arr.dtype}")
      return np.zeros(got, self.dtype)
    out = arr.astype(np.float32)
    if not np.all(np.isfinite(out)):
      self.problems.append(f"key {full!r} holds NaN or Inf")
    return out.astype(self.dtype)

  def stack(self, fmt: str, n: int, fn=lambda x: x) -> np.ndarray:
    return np.stack([fn(self.take(fmt.format(i))) for i in range(n)])

  def unused(self) -> list[str]:
    return sorted(k for k in self.tensors if k.startswith(self.prefix) and k not in self.used)

  def finish(self, ignore: tuple[str, ...] = ()) -> None:
    """Raises CheckpointError listing every problem and every unknown key
    (keys under `prefix` not taken; `ignore`: key prefixes never used, such as
    buffers some writers save)."""
    unknown = [k for k in self.unused() if not k.startswith(tuple(self.prefix + i for i in ignore))]
    problems = list(self.problems) + [
        f"unknown key {k!r} with shape {tuple(np.shape(self.tensors[k]))}" for k in unknown]
    if problems:
      raise misfit(self.source, problems)
