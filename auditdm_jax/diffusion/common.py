"""What every FLUX component's loader shares: reading safetensors (one file,
a directory of shards with or without a `*.safetensors.index.json`, local or
any fsspec URL such as gs://, never unpickling), and taking tensors out of a
state dict with their shapes checked, so that a wrong, missing or unknown key
is an error that names the file, the key and both shapes.

Each component module (`flux.py`, `vae.py`, `text.py`) converts a
state dict into its own parameter tree with a `Taker`:

    take = Taker(tensors, source="…/transformer", dtype=np.float32)
    w = take("x_embedder.weight", (inner, in_channels))   # torch layout, checked
    ...
    take.finish()   # every key not taken is reported as unknown
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from auditdm_jax.models.ckpt.common import BFLOAT16, CheckpointError, as_dtype, listed_problems
from auditdm_jax.models.ckpt.hf import read_safetensors
from auditdm_jax.utils import fileio

__all__ = ["BFLOAT16", "CheckpointError", "Tensors", "Taker", "read_tensors",
           "read_json", "as_dtype"]


class Tensors(dict):
  """{name: array}, remembering which file each tensor came from."""

  def __init__(self, *args, **kw):
    super().__init__(*args, **kw)
    self.files: dict[str, str] = {}

  def file_of(self, key: str) -> str:
    return self.files.get(key, "?")


def _local(path: str) -> str:
  return fileio.stage(os.fspath(path)) if fileio.is_remote(os.fspath(path)) else \
      os.path.expanduser(os.fspath(path))


def read_json(path: str) -> dict:
  """A JSON object from a local path or URL, with errors naming the file."""
  try:
    with fileio.open_read(path, "r") as f:
      out = json.load(f)
  except FileNotFoundError as e:
    raise CheckpointError(f"checkpoint {path}: file not found") from e
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"checkpoint {path}: unreadable JSON: {e}") from e
  if not isinstance(out, dict):
    raise CheckpointError(f"checkpoint {path}: not a JSON object")
  return out


def read_tensors(path: str) -> Tensors:
  """All tensors of a .safetensors file or of a directory of them.

  A directory is read through its `*.safetensors.index.json` when it has one
  (every shard it names must exist), else every `*.safetensors` in it. Remote
  paths are staged to the local cache first (`utils.fileio.stage`). Arrays are
  memory-mapped, read-only, in the file's dtype (bfloat16 as ml_dtypes).
  """
  local = _local(path)
  out = Tensors()
  if os.path.isfile(local):
    files = [local]
  elif os.path.isdir(local):
    index = sorted(f for f in os.listdir(local) if f.endswith(".safetensors.index.json"))
    if index:
      ipath = os.path.join(local, index[0])
      weight_map = read_json(ipath).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"checkpoint {ipath}: no 'weight_map' in the shard index")
      files = [os.path.join(local, f) for f in sorted(set(weight_map.values()))]
      for f in files:
        if not os.path.isfile(f):
          raise CheckpointError(f"checkpoint {ipath}: names shard {os.path.basename(f)!r}, "
                                f"which is not in {path}")
    else:
      files = sorted(os.path.join(local, f) for f in os.listdir(local)
                     if f.endswith(".safetensors"))
    if not files:
      raise CheckpointError(f"checkpoint {path}: no .safetensors files")
  else:
    raise CheckpointError(f"checkpoint {path}: no such file or directory")
  for f in files:
    for key, arr in read_safetensors(f).items():
      if key in out:
        raise CheckpointError(f"checkpoint {path}: tensor {key!r} is in both "
                              f"{out.file_of(key)} and {f}")
      out[key] = arr
      out.files[key] = f
  return out


class Taker:
  """Takes tensors out of a state dict by name, checking shapes.

  `take(key, shape)` returns the array cast to `dtype` (float32 through
  float32 so bfloat16 files cast exactly); every problem is collected and
  raised together by `finish()` (or at once with `strict_now=True`), naming
  the source, the key and the shapes. `finish()` also reports every key that
  was never taken as unknown.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str,
               dtype: Any = np.float32, prefix: str = ""):
    self.tensors = tensors
    self.source = source
    self.dtype = as_dtype(dtype)
    self.prefix = prefix
    self.used: set[str] = set()
    self.problems: list[str] = []

  def has(self, key: str) -> bool:
    return self.prefix + key in self.tensors

  def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    full = self.prefix + key
    if full not in self.tensors:
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
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == BFLOAT16):
      self.problems.append(f"key {full!r} has non-float dtype {arr.dtype}")
      return np.zeros(got, self.dtype)
    out = arr.astype(np.float32)
    if not np.all(np.isfinite(out)):
      self.problems.append(f"key {full!r} holds NaN or Inf")
    return out.astype(self.dtype)

  def finish(self, ignore: tuple[str, ...] = ()) -> None:
    """Raises CheckpointError listing every problem and every unknown key
    (keys under `prefix` not taken; `ignore`: key prefixes never used, such as
    buffers some writers save)."""
    unknown = sorted(k for k in self.tensors if k.startswith(self.prefix)
                     and k not in self.used and not k.startswith(tuple(self.prefix + i for i in ignore)))
    problems = list(self.problems) + [
        f"unknown key {k!r} with shape {tuple(np.shape(self.tensors[k]))}" for k in unknown]
    if problems:
      raise CheckpointError(f"checkpoint {self.source} does not fit the model config:"
                            f"{listed_problems(problems)}")
