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
import posixpath
from typing import Any

from auditdm_jax.models.ckpt.common import BFLOAT16, CheckpointError, Taker, as_dtype
from auditdm_jax.models.ckpt.hf import read_safetensors
from auditdm_jax.utils import fileio

__all__ = ["BFLOAT16", "CheckpointError", "Tensors", "Taker", "read_tensors",
           "read_json", "as_dtype", "dtype_name", "config_beside"]

DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(dtype: Any, allowed: tuple[str, ...] = DTYPES) -> str:
  """'float32' / 'bfloat16' / 'float16' (those `allowed`) for a name or dtype;
  ValueError otherwise."""
  try:
    name = str(as_dtype(dtype))
  except TypeError:
    name = None
  if name not in allowed:
    raise ValueError(f"dtype must be one of {allowed}, got {dtype!r}")
  return name


def config_beside(path: str) -> str:
  """The config.json of a component: inside the directory `path`, or beside
  the weights file `path` (.safetensors / .json), local or remote."""
  p = os.fspath(path)
  if p.endswith(".safetensors") or p.endswith(".json"):
    base = posixpath.dirname(p) if fileio.is_remote(p) else os.path.dirname(p)
    return fileio.join(base or ".", "config.json")
  return fileio.join(p, "config.json")


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
