"""FLUX's text encoder checkpoints: transformers' T5EncoderModel and
CLIPTextModel safetensors (single or sharded; CLIP with or without the
`text_model.` prefix) into `text`'s parameter trees, and the loaders of a
diffusers FLUX pipeline's `text_encoder_2/` and `text_encoder/`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from auditdm_jax.diffusion.common import Taker, config_beside, read_json, read_tensors
from auditdm_jax.diffusion.text import ClipText, ClipTextConfig, T5Config, T5Encoder

__all__ = ["t5_params_from_hf", "clip_params_from_hf", "load_t5", "load_clip"]


def _linear(take: Taker, key: str, out_dim: int, in_dim: int) -> np.ndarray:
  """A torch Linear weight [out, in] as a kernel [in, out]."""
  return take.take(key, (out_dim, in_dim)).T


def t5_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: T5Config,
                      source: str = "T5 encoder checkpoint") -> dict:
  """Our T5 parameter tree from transformers T5EncoderModel tensors (the tied
  `shared.weight` / `encoder.embed_tokens.weight`, either or both). Raises
  CheckpointError naming every missing, wrong-shape or unknown key."""
  take = Taker(tensors, source, cfg.dtype)
  c = cfg
  d, inner, f = c.d_model, c.inner_dim, c.d_ff
  emb_keys = [k for k in ("shared.weight", "encoder.embed_tokens.weight") if k in tensors]
  embeds = [take.take(k, (c.vocab_size, d)) for k in emb_keys or ["shared.weight"]]
  params: dict[str, Any] = {
      "embed": {"embedding": embeds[0]},
      "rel_bias": {"embedding": take.take(
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
          (c.relative_attention_num_buckets, c.num_heads))},
  }
  for i in range(c.num_layers):
    p = f"encoder.block.{i}.layer."
    params[f"layers_{i}"] = {
        "attn_norm": {"scale": take.take(p + "0.layer_norm.weight", (d,))},
        "attn": {n: {"kernel": _linear(take, f"{p}0.SelfAttention.{n}.weight", inner, d)}
                 for n in ("q", "k", "v")}
                | {"o": {"kernel": _linear(take, f"{p}0.SelfAttention.o.weight", d, inner)}},
        "ffn_norm": {"scale": take.take(p + "1.layer_norm.weight", (d,))},
        "ffn": {"wi_0": {"kernel": _linear(take, p + "1.DenseReluDense.wi_0.weight", f, d)},
                "wi_1": {"kernel": _linear(take, p + "1.DenseReluDense.wi_1.weight", f, d)},
                "wo": {"kernel": _linear(take, p + "1.DenseReluDense.wo.weight", d, f)}},
    }
  params["final_norm"] = {"scale": take.take("encoder.final_layer_norm.weight", (d,))}
  take.finish()
  return params


def clip_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ClipTextConfig,
                        source: str = "CLIP text checkpoint") -> dict:
  """Our CLIP text parameter tree from transformers CLIPTextModel tensors,
  named with the `text_model.` prefix (transformers 4, FLUX's files) or
  without it (transformers 5's save_pretrained). The non-persistent
  `position_ids` buffer some old files hold is ignored."""
  prefix = "text_model." if any(k.startswith("text_model.") for k in tensors) else ""
  take = Taker(tensors, source, cfg.dtype)
  c = cfg
  d, f = c.hidden_size, c.intermediate_size

  def t(key, shape):
    return take.take(prefix + key, shape)

  def dense(key, out_dim, in_dim):
    return {"kernel": t(key + ".weight", (out_dim, in_dim)).T, "bias": t(key + ".bias", (out_dim,))}

  def norm(key):
    return {"scale": t(key + ".weight", (d,)), "bias": t(key + ".bias", (d,))}

  params: dict[str, Any] = {"embed": {
      "token_embedding": t("embeddings.token_embedding.weight", (c.vocab_size, d)),
      "position_embedding": t("embeddings.position_embedding.weight",
                              (c.max_position_embeddings, d))}}
  for i in range(c.num_layers):
    p = f"encoder.layers.{i}."
    params[f"layers_{i}"] = {
        "ln_1": norm(p + "layer_norm1"),
        "attn": {"q": dense(p + "self_attn.q_proj", d, d), "k": dense(p + "self_attn.k_proj", d, d),
                 "v": dense(p + "self_attn.v_proj", d, d),
                 "o": dense(p + "self_attn.out_proj", d, d)},
        "ln_2": norm(p + "layer_norm2"),
        "mlp": {"fc1": dense(p + "mlp.fc1", f, d), "fc2": dense(p + "mlp.fc2", d, f)},
    }
  params["final_norm"] = norm("final_layer_norm")
  take.finish(ignore=("text_model.embeddings.position_ids", "embeddings.position_ids"))
  return params


def load_t5(path: str, dtype: Any = "bfloat16") -> T5Encoder:
  """A transformers T5EncoderModel directory (config.json + model.safetensors
  or shards with model.safetensors.index.json), e.g. FLUX's text_encoder_2/."""
  cfg = T5Config.from_hf(read_json(config_beside(path)), dtype)
  return T5Encoder(cfg, t5_params_from_hf(read_tensors(path), cfg, os.fspath(path)))


def load_clip(path: str, dtype: Any = "bfloat16") -> ClipText:
  """A transformers CLIPTextModel directory, e.g. FLUX's text_encoder/."""
  cfg = ClipTextConfig.from_hf(read_json(config_beside(path)), dtype)
  return ClipText(cfg, clip_params_from_hf(read_tensors(path), cfg, os.fspath(path)))
