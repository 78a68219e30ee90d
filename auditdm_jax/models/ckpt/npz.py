"""big_vision `.npz` checkpoints of PaliGemma / PaliGemma 2.

The file is a flat `np.savez` archive: keys are the parameter paths joined with
'/' (`img/...`, `llm/...`, optionally under a leading `params/`), scanned layers
carry a leading depth axis, and bfloat16 arrays are stored as 2-byte void
(`|V2`) because numpy has no bfloat16. Our parameter tree uses the same names,
so reading is key-for-key with three adjustments: a fused `qkv_einsum`
(num_heads == num_kv_heads) is split into q/kv, the vocabulary rows are
truncated or padded to the config, and position embeddings are resampled when
the requested resolution differs from the file's.
"""

from __future__ import annotations

import os
import zipfile

import flax
import numpy as np

from auditdm_jax.models import presets
from auditdm_jax.models.ckpt.common import (BFLOAT16, CheckpointError,
                                            adjust_vocab_rows, assemble,
                                            flatten, require)
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.gemma import GemmaConfig
from auditdm_jax.models.siglip import SigLIPConfig, resample_posemb
from auditdm_jax.utils.fileio import atomic_write


def read_npz(path: str) -> dict[str, np.ndarray]:
  """Reads a big_vision .npz into {key: array}, restoring bfloat16."""
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint {path}: no such file")
  try:
    with np.load(path, allow_pickle=False) as z:
      flat = {k: z[k] for k in z.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
    raise CheckpointError(f"checkpoint {path}: not a readable .npz archive "
                          f"(truncated or corrupt?): {e}") from e
  if not flat:
    raise CheckpointError(f"checkpoint {path}: the archive holds no arrays")
  out = {}
  for k, v in flat.items():
    if v.dtype.kind == "V" and v.dtype.itemsize == 2:
      v = v.view(BFLOAT16)
    if k.startswith("params/"):
      k = k[len("params/"):]
    out[k] = v
  return out


def write_npz(path: str, params) -> None:
  """Writes params as a big_vision .npz (atomically: temp file, then rename)."""
  flat = {}
  for k, v in flatten(params).items():
    if v.dtype == BFLOAT16:
      v = v.view(np.dtype("V2"))
    flat[k] = v
  with atomic_write(path) as f:
    np.savez(f, **flat)


def to_bv_layout(params, cfg: VLMConfig) -> dict[str, np.ndarray]:
  """Our params -> big_vision key layout (re-fusing qkv when N == K)."""
  flat = flatten(params)
  if cfg.text.num_heads == cfg.text.num_kv_heads:
    q = flat.pop("llm/layers/attn/q_einsum/w")
    kv = flat.pop("llm/layers/attn/kv_einsum/w")
    flat["llm/layers/attn/qkv_einsum/w"] = np.concatenate([q[:, None], kv], axis=1)
  return flat


def export_npz(path: str, params, cfg: VLMConfig) -> None:
  if cfg.family != "paligemma":
    raise ValueError("big_vision .npz export is defined for PaliGemma models; "
                     f"this is a {cfg.family} model")
  write_npz(path, flax.traverse_util.unflatten_dict(to_bv_layout(params, cfg), sep="/"))


def _split_qkv(flat: dict) -> dict:
  key = "llm/layers/attn/qkv_einsum/w"
  if key in flat:
    w = flat.pop(key)  # [L, 3, N, D, H]
    flat["llm/layers/attn/q_einsum/w"] = w[:, 0]
    flat["llm/layers/attn/kv_einsum/w"] = w[:, 1:3]
  return flat


def infer_config(flat: dict, source: str, image_size: int | None = None) -> VLMConfig:
  """Architecture from array shapes; non-shape hyper-parameters (soft-caps,
  query scaling) from the matching published Gemma 2 size."""
  flat = _split_qkv(dict(flat))
  emb = require(flat, "llm/embedder/input_embedding", source, 2)
  q = require(flat, "llm/layers/attn/q_einsum/w", source, 4)
  kv = require(flat, "llm/layers/attn/kv_einsum/w", source, 5)
  gating = require(flat, "llm/layers/mlp/gating_einsum", source, 4)
  depth, heads, width, head_dim = q.shape
  gemma2 = "llm/layers/post_attention_norm/scale" in flat
  text = dict(width=width, depth=depth, mlp_dim=gating.shape[-1], num_heads=heads,
              num_kv_heads=kv.shape[2], head_dim=head_dim,
              vocab_size=emb.shape[0], post_norms=gemma2)
  if gemma2:
    text.update(attn_logits_softcap=50.0, final_logits_softcap=30.0)
    for size, (w, l, *_rest) in presets._GEMMA2.items():  # pylint: disable=protected-access
      if (w, l) == (width, depth):
        text["query_pre_attn_scalar"] = presets.gemma2_text(size).query_pre_attn_scalar
  kernel = require(flat, "img/embedding/kernel", source, 4)
  vq = require(flat, "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel",
               source, 4)
  mlp = require(flat, "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel", source, 3)
  head = require(flat, "img/head/kernel", source, 2)
  patch = kernel.shape[0]
  if "img/pos_embedding" in flat:
    posemb = "learn"
    pos = require(flat, "img/pos_embedding", source, 3)
    image_size = image_size or int(round(np.sqrt(pos.shape[1]))) * patch
  else:  # fixed sine-cosine position embeddings carry no parameter
    posemb = "sincos2d"
    if not image_size:
      raise CheckpointError(f"checkpoint {source}: no img/pos_embedding (a sincos2d "
                            "vision tower), so the image size cannot be inferred; "
                            "pass a config or image_size")
  vision = SigLIPConfig(image_size=image_size, patch_size=patch,
                        width=kernel.shape[-1], depth=vq.shape[0], mlp_dim=mlp.shape[-1],
                        num_heads=vq.shape[2], out_dim=head.shape[-1], posemb=posemb)
  variant = os.path.splitext(os.path.basename(source))[0]
  return VLMConfig(family="paligemma", variant=variant, vision=vision,
                   text=GemmaConfig(**text))


def params_from_npz(flat: dict, cfg: VLMConfig, source: str) -> dict:
  if cfg.family != "paligemma":
    raise CheckpointError(f"checkpoint {source}: a big_vision .npz holds a "
                          f"PaliGemma model, but the config is {cfg.family}")
  flat = _split_qkv(dict(flat))
  key = "llm/embedder/input_embedding"
  if key in flat:
    flat[key] = adjust_vocab_rows(flat[key], cfg.text.vocab_size)
  key = "img/pos_embedding"
  if key in flat and np.ndim(flat[key]) == 3:
    flat[key] = resample_posemb(flat[key], cfg.vision.grid)
  return assemble(flat, cfg, source)
