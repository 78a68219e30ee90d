"""Incremental decoding through a Gemma decoder, one new token per row: the
per-layer weights in decoding layout (`decode_weights`), single-query
attention over a KV cache (`decode_attention`) and the step itself
(`decode_step`), numerically the layers of `gemma.Gemma` (the sampler's
decode loop runs it; `Gemma.__call__` is the prefill).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax.models.gemma import (BIG_NEG, GemmaConfig, apply_rope, rms_norm,
                                      rope_tables)
from auditdm_jax.models.logical import constrain


def decode_weights(cfg: GemmaConfig, layers) -> list[dict]:
  """Per-layer weights in the layout of `decode_step` (traceable).

  From the stacked `layers` params: one [D, (N + 2K) * H] matrix for q/k/v,
  [N * H, D] for the output, [D, 2F] for gate and up, [F, D] for down, plus
  the norm scales. Converting once per decoding call, outside the token loop,
  turns every per-token projection into one plain 2-D matmul over contiguous
  weights, instead of slicing (and on some backends copying) the stacked
  arrays at every step.
  """
  n, k, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.width, cfg.head_dim
  a = layers["attn"]
  out = []
  for i in range(cfg.depth):
    q = a["q_einsum"]["w"][i].transpose(1, 0, 2).reshape(d, n * h)
    kv = a["kv_einsum"]["w"][i].transpose(2, 0, 1, 3).reshape(d, 2 * k * h)
    gating = layers["mlp"]["gating_einsum"][i]
    w = {
        "qkv": jnp.concatenate([q, kv], axis=1),
        "out": a["attn_vec_einsum"]["w"][i].reshape(n * h, d),
        "gate_up": jnp.concatenate([gating[0], gating[1]], axis=1),
        "down": layers["mlp"]["linear"][i],
    }
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if cfg.post_norms:
      norms += ["post_attention_norm", "post_ffw_norm"]
    for name in norms:
      w[name] = layers[name]["scale"][i]
    if cfg.qk_norm:
      w["query_norm"] = a["query_norm"]["scale"][i]
      w["key_norm"] = a["key_norm"]["scale"][i]
    out.append(w)
  return out


def decode_attention(q, k, v, mask, softcap: float | None = None):
  """Attention of one query per row: q [B, 1, N, H], cache k/v [B, S, K, H],
  mask [B, S]. Written as multiply-and-reduce rather than a batched matmul:
  with a single query the work is a memory-bound pass over the cache, which
  this form fuses into one read (2-3x faster than the einsum on CPU)."""
  b, _, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, 1, kv_heads, n // kv_heads, h).astype(jnp.float32)
  logits = jnp.sum(q * k[:, :, :, None, :].astype(jnp.float32), axis=-1)   # [B,S,K,G]
  if softcap:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask[:, :, None, None], logits, BIG_NEG)
  probs = jax.nn.softmax(logits, axis=1)
  out = jnp.sum(probs[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1)
  return out.reshape(b, 1, n, h).astype(v.dtype)


def _update_cache(cache, k, v, q_pos, slot):
  """Writes one token per row: at a shared slot (scalar, a linear cache) or at
  per-row slots [B] (a ring)."""
  if jnp.ndim(slot) == 0:
    upd = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x[:, None].astype(c.dtype),  # noqa: E731
                                                           slot, axis=1)
    return {"k": upd(cache["k"], k), "v": upd(cache["v"], v), "pos": upd(cache["pos"], q_pos)}
  rows = jnp.arange(k.shape[0])
  return {"k": cache["k"].at[rows, slot].set(k.astype(cache["k"].dtype)),
          "v": cache["v"].at[rows, slot].set(v.astype(cache["v"].dtype)),
          "pos": cache["pos"].at[rows, slot].set(q_pos)}


def decode_step(cfg: GemmaConfig, params, weights, tokens, q_pos, caches, slots, head=None):
  """One new token per row through every layer (unrolled, so each layer's
  cache has its own length: rings of `sliding_window` slots for local layers).

  params: the Gemma params (its "embedder" and "final_norm" are used here).
  weights: `decode_weights(cfg, params["layers"])`.
  tokens [B] at positions q_pos [B]; caches: per layer {"k", "v": [B, C, K, H],
  "pos": [B, C] (-1 = empty)}; slots: per layer, a scalar slot (linear cache)
  or per-row slots [B] (ring). Attention is masked by position alone: a row
  sees cached positions <= its own (and within the window on local layers).
  head: None (the logits read the embedding table [V, D] as it is) or the
  table transposed once by the caller, [D, V]: the same logits (up to float
  summation order) from a plain matmul, which XLA:CPU runs ~1.4x faster.
  Returns (logits float32 [B, V], new caches).
  """
  dtype = jnp.dtype(cfg.dtype)
  n, k, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.width, cfg.head_dim
  table = params["embedder"]["input_embedding"]
  x = jnp.take(table, tokens, axis=0).astype(dtype) * jnp.asarray(np.sqrt(d), dtype)
  b = x.shape[0]
  tables = {"local": rope_tables(q_pos[:, None], h, cfg.rope_base_local, cfg.rope_scale_local),
            "global": rope_tables(q_pos[:, None], h, cfg.rope_base_global,
                                  cfg.rope_scale_global)}
  new_caches = []
  for w, kind, cache, slot in zip(weights, cfg.layer_types, caches, slots):
    sin, cos = tables[kind]
    y = rms_norm(x, w["pre_attention_norm"], cfg.norm_eps)
    qkv = jnp.dot(y, w["qkv"].astype(dtype))
    q = qkv[:, :n * h].reshape(b, 1, n, h)
    kk = qkv[:, n * h:(n + k) * h].reshape(b, 1, k, h)
    vv = qkv[:, (n + k) * h:].reshape(b, 1, k, h)
    if cfg.qk_norm:
      q = rms_norm(q, w["query_norm"], cfg.norm_eps)
      kk = rms_norm(kk, w["key_norm"], cfg.norm_eps)
    q = apply_rope(q, sin, cos) * jnp.asarray(cfg.query_scale, dtype)
    kk = apply_rope(kk, sin, cos)
    cache = _update_cache(cache, kk[:, 0], vv[:, 0], q_pos, slot)
    kv_pos = cache["pos"]
    mask = (kv_pos >= 0) & (kv_pos <= q_pos[:, None])
    if kind == "local" and cfg.sliding_window:
      mask &= q_pos[:, None] - kv_pos < cfg.sliding_window
    att = decode_attention(q, cache["k"], cache["v"], mask, cfg.attn_logits_softcap)
    y = jnp.dot(att.reshape(b, n * h), w["out"].astype(dtype))
    if cfg.post_norms:
      y = rms_norm(y, w["post_attention_norm"], cfg.norm_eps)
    x = x + y
    y = jnp.dot(rms_norm(x, w["pre_ffw_norm"], cfg.norm_eps), w["gate_up"].astype(dtype))
    y = nn.gelu(y[:, :cfg.mlp_dim], approximate=True) * y[:, cfg.mlp_dim:]
    y = jnp.dot(y, w["down"].astype(dtype))
    if cfg.post_norms:
      y = rms_norm(y, w["post_ffw_norm"], cfg.norm_eps)
    x = x + y
    new_caches.append(cache)
  # Final norm and the tied output projection, as in Gemma.head.
  x = rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)
  if head is None:
    logits = jnp.einsum("BD,VD->BV", x, table.astype(dtype), preferred_element_type=jnp.float32)
  else:
    logits = jnp.dot(x, head.astype(dtype), preferred_element_type=jnp.float32)
  if cfg.final_logits_softcap:
    logits = jnp.tanh(logits / cfg.final_logits_softcap) * cfg.final_logits_softcap
  return constrain(logits, "batch", "vocab"), new_caches
