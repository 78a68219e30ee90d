"""`read(path)`: detect a checkpoint's format and read it as a `Checkpoint`
(config, params, tokenizer); `models.load` wraps that in a `VLM` handle.
Nothing here imports the handle: the arrow runs handle -> ckpt.

Formats:
  bv_npz       a big_vision PaliGemma `.npz` file
  hf           a Hugging Face directory (config.json + *.safetensors)
  gemma3_flat  the official Gemma 3 Orbax checkpoint (FLAT or NESTED tree)
  auditdm      our own Orbax directory (auditdm_model.json + params/)

No loader unpickles. Errors name the file, the key and both shapes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

from auditdm_jax.models.ckpt import hf, npz, orbax_io
from auditdm_jax.models.ckpt.common import CheckpointError
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.tokenizer import Tokenizer
from auditdm_jax.utils import fileio

FORMATS = ("bv_npz", "hf", "gemma3_flat", "auditdm")


def detect_format(path: str) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint {path}: no such file or directory")
  if os.path.isfile(path):
    if path.endswith(".npz"):
      return "bv_npz"
    with open(path, "rb") as f:
      magic = f.read(4)
    if magic == b"PK\x03\x04":
      return "bv_npz"
    raise CheckpointError(f"checkpoint {path}: a file that is not a .npz archive; "
                          f"known formats: {FORMATS}")
  if os.path.exists(os.path.join(path, orbax_io.NATIVE_MARKER)):
    return "auditdm"
  if os.path.exists(os.path.join(path, "config.json")):
    return "hf"
  if orbax_io.is_orbax_dir(path):
    return "gemma3_flat"
  raise CheckpointError(f"checkpoint {path}: directory with neither config.json, "
                        f"{orbax_io.NATIVE_MARKER} nor Orbax metadata; known formats: "
                        f"{FORMATS}")


def _with_dtypes(cfg: VLMConfig, dtype, param_dtype) -> VLMConfig:
  return cfg.with_dtypes(dtype, param_dtype) if (dtype or param_dtype) else cfg


def _find_tokenizer(path: str, explicit: str | None) -> str | None:
  if explicit:
    return explicit
  base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  for name in ("tokenizer.model",):
    if os.path.isfile(os.path.join(base, name)):
      return os.path.join(base, name)
  if os.path.isfile(path):
    stem = os.path.splitext(path)[0] + ".model"
    if os.path.isfile(stem):
      return stem
  return None


class Checkpoint(NamedTuple):
  """What `read` returns: the parts a `VLM` handle is made of."""
  config: VLMConfig
  params: Any
  tokenizer: Tokenizer | None


def read(path: str, *, config: VLMConfig | None = None, tokenizer: str | None = None,
         dtype: str | None = None, param_dtype: str | None = None,
         image_size: int | None = None) -> Checkpoint:
  """Reads any supported checkpoint (`models.load` makes it a `VLM`).

  path: a local file or directory, or a URL (gs://bucket/...; any fsspec
    filesystem): a remote checkpoint is copied once into $AUDITDM_CACHE
    (default ~/.cache/auditdm) with its tokenizer, then read from there.

  config: the architecture to load into; inferred from the file when omitted
    (from config.json, auditdm_model.json, or array shapes plus the matching
    published preset for .npz / Gemma 3 Orbax).
  tokenizer: a sentencepiece model; by default `tokenizer.model` beside or
    inside the checkpoint, if present.
  image_size: load the vision tower at another resolution (position
    embeddings are resampled).
  """
  path = os.fspath(path)
  if fileio.is_remote(path):   # gs://...: a local copy, staged once (fileio.stage)
    stem = path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    path = fileio.stage(path, extra=("tokenizer.model", f"{stem}.model"))
  fmt = detect_format(path)
  tok_path = None
  if fmt == "bv_npz":
    flat = npz.read_npz(path)
    cfg = config or npz.infer_config(flat, path, image_size)
    cfg = _resize(_with_dtypes(cfg, dtype, param_dtype), image_size)
    params = npz.params_from_npz(flat, cfg, path)
  elif fmt == "hf":
    meta, tensors = hf.read_hf_dir(path)
    tok_path = _find_tokenizer(path, tokenizer)
    wrap = None
    if tok_path and meta.get("model_type") == "gemma3":
      wrap = Tokenizer(tok_path, "gemma3").piece_id("\n\n")
    cfg = config or hf.config_from_hf(meta, path, image_wrap_id=wrap)
    cfg = _resize(_with_dtypes(cfg, dtype, param_dtype), image_size)
    params = hf.params_from_hf(tensors, cfg, path)
  elif fmt == "gemma3_flat":
    flat = orbax_io.read_gemma3(path)
    cfg = config or orbax_io.infer_gemma3_config(flat, path)
    cfg = _resize(_with_dtypes(cfg, dtype, param_dtype), image_size)
    params = orbax_io.params_from_gemma3(flat, cfg, path)
  else:
    saved_cfg, flat, tok_path = orbax_io.read_native(path)
    cfg = _resize(_with_dtypes(config or saved_cfg, dtype, param_dtype), image_size)
    params = orbax_io.params_from_native(flat, cfg, path)
  tok_path = tokenizer or tok_path or _find_tokenizer(path, None)
  tok = Tokenizer(tok_path, cfg.family) if tok_path else None
  if tok is not None and tok.vocab_size > cfg.text.vocab_size:
    raise CheckpointError(f"checkpoint {path}: tokenizer {tok_path} has "
                          f"{tok.vocab_size} pieces but the model only "
                          f"{cfg.text.vocab_size} embedding rows")
  return Checkpoint(cfg, params, tok)


def _resize(cfg: VLMConfig, image_size: int | None) -> VLMConfig:
  if not image_size or image_size == cfg.vision.image_size:
    return cfg
  return cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=image_size))


__all__ = ["Checkpoint", "CheckpointError", "FORMATS", "detect_format", "read"]
