"""FLUX's two text encoders: the T5 v1.1 encoder (FLUX.1 uses XXL's
`last_hidden_state`, [B, 512, 4096]) and the CLIP-L text model (FLUX.1 uses
its pooled output, [B, 768]), numerically equal to transformers'
`T5EncoderModel` / `CLIPTextModel`.

T5 (pre-norm, RMS norms without bias or mean, no bias anywhere, q·k not
scaled, relative position buckets computed once from block 0's table and
added in every layer, gated-gelu (tanh) FFN). FLUX passes no attention mask
to T5, so every position (padding included) attends to every position; so do
we. Parameter layout (torch `Linear` weights transposed to `kernel [in, out]`):

  embed/embedding                                 [V, D]
  rel_bias/embedding                              [num_buckets, H]
  layers_{i}/attn_norm/scale                      [D]
  layers_{i}/attn/{q,k,v}/kernel                  [D, H*d_kv]
  layers_{i}/attn/o/kernel                        [H*d_kv, D]
  layers_{i}/ffn_norm/scale                       [D]
  layers_{i}/ffn/{wi_0,wi_1}/kernel               [D, F]
  layers_{i}/ffn/wo/kernel                        [F, D]
  final_norm/scale                                [D]

CLIP text (pre-LayerNorm, causal self-attention with biases, quick_gelu MLP,
learned absolute positions). The pooled output is the final-normed state at
the end token, found exactly as transformers finds it: the position of the
largest id when `eos_token_id == 2` (the legacy rule the openai/FLUX config
triggers), else the first position holding `eos_token_id`. Layout:

  embed/token_embedding                           [V, D]
  embed/position_embedding                        [P, D]
  layers_{i}/ln_1/{scale,bias}                    [D]
  layers_{i}/attn/{q,k,v,o}/{kernel [D, D], bias [D]}
  layers_{i}/ln_2/{scale,bias}                    [D]
  layers_{i}/mlp/fc1/{kernel [D, F], bias [F]}
  layers_{i}/mlp/fc2/{kernel [F, D], bias [D]}
  final_norm/{scale,bias}                         [D]

Compute runs in the config dtype (bfloat16 for the real checkpoints) with
norms and softmax in float32. Checkpoints are transformers' own safetensors
(`save_pretrained` of T5EncoderModel / CLIPTextModel, single or sharded, with
or without the `text_model.` prefix that transformers 4 wrote for CLIP), as in
a diffusers FLUX pipeline's `text_encoder_2/` and `text_encoder/`; they are
read by `diffusion/ckpt/text.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax.diffusion.common import as_dtype, dtype_name

__all__ = ["T5Config", "ClipTextConfig", "T5_XXL", "CLIP_L", "t5_init", "clip_init",
           "t5_encode", "clip_encode", "T5Encoder", "ClipText"]

_DTYPES = ("float32", "bfloat16")
_T5_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh")   # all the tanh gelu in T5
_CLIP_ACTS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


def _check_positive(cls_name: str, obj, names) -> None:
  problems = []
  for name in names:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
      problems.append(f"{name} must be a positive int, got {v!r}")
  if str(obj.dtype) not in _DTYPES:
    problems.append(f"dtype must be one of {_DTYPES}, got {obj.dtype!r}")
  if problems:
    raise ValueError(f"Invalid {cls_name}: " + "; ".join(problems))


def _require(d: Mapping, fields, what: str) -> None:
  missing = [f for f in fields if f not in d]
  if missing:
    raise ValueError(f"{what} config lacks {', '.join(missing)}")


# --------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 v1.1 encoder hyper-parameters (defaults: T5 v1.1 XXL, FLUX's)."""

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: str = "bfloat16"

  def __post_init__(self):
    _check_positive("T5Config", self, ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                                       "num_heads", "relative_attention_num_buckets",
                                       "relative_attention_max_distance"))
    if self.relative_attention_num_buckets < 4:
      raise ValueError("Invalid T5Config: relative_attention_num_buckets must be >= 4, got "
                       f"{self.relative_attention_num_buckets}")

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_hf(cls, d: Mapping[str, Any], dtype: Any = "bfloat16") -> "T5Config":
    """From a transformers T5 `config.json` (dict). Only gated-gelu (tanh)
    feed-forward layers, T5 v1.1's, are supported."""
    _require(d, ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"), "T5")
    proj = str(d.get("feed_forward_proj", "relu"))
    parts = proj.split("-")
    if len(parts) != 2 or parts[0] != "gated" or parts[1] not in _T5_ACTS:
      raise ValueError(f"T5 config feed_forward_proj={proj!r} is not supported: only "
                       f"gated gelu feed-forward layers (T5 v1.1, 'gated-gelu') are")
    return cls(vocab_size=int(d["vocab_size"]), d_model=int(d["d_model"]),
               d_kv=int(d["d_kv"]), d_ff=int(d["d_ff"]), num_layers=int(d["num_layers"]),
               num_heads=int(d["num_heads"]),
               relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
               relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
               layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
               dtype=dtype_name(dtype, _DTYPES))


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """CLIP text-tower hyper-parameters (defaults: CLIP ViT-L/14, FLUX's)."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2
  dtype: str = "bfloat16"

  def __post_init__(self):
    _check_positive("ClipTextConfig", self, ("vocab_size", "hidden_size", "intermediate_size",
                                             "num_layers", "num_heads",
                                             "max_position_embeddings"))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"Invalid ClipTextConfig: hidden_size {self.hidden_size} is not a "
                       f"multiple of num_heads {self.num_heads}")
    if self.hidden_act not in _CLIP_ACTS:
      raise ValueError(f"Invalid ClipTextConfig: hidden_act must be one of {_CLIP_ACTS}, "
                       f"got {self.hidden_act!r}")

  @classmethod
  def from_hf(cls, d: Mapping[str, Any], dtype: Any = "bfloat16") -> "ClipTextConfig":
    """From a transformers CLIPTextModel `config.json` (dict)."""
    _require(d, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads"), "CLIP text")
    eos = d.get("eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
      raise ValueError(f"CLIP text config eos_token_id={eos!r}: a single id is required")
    act = d.get("hidden_act", "quick_gelu")
    if act not in _CLIP_ACTS:
      raise ValueError(f"CLIP text config hidden_act={act!r} is not supported "
                       f"(one of {_CLIP_ACTS})")
    return cls(vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
               intermediate_size=int(d["intermediate_size"]),
               num_layers=int(d["num_hidden_layers"]), num_heads=int(d["num_attention_heads"]),
               max_position_embeddings=int(d.get("max_position_embeddings", 77)),
               hidden_act=act, layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
               eos_token_id=int(eos), dtype=dtype_name(dtype, _DTYPES))


T5_XXL = T5Config()
CLIP_L = ClipTextConfig()


# --------------------------------------------------------------------------- shared
def _check_ids(ids, vocab_size: int, what: str, max_len: int | None = None):
  """Static checks (rank, dtype, length) always; value range when concrete."""
  shape = np.shape(ids)
  if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
    raise ValueError(f"{what} expects token ids of shape [batch, length], got shape "
                     f"{tuple(shape)}")
  dt = ids.dtype if hasattr(ids, "dtype") else np.asarray(ids).dtype
  if not np.issubdtype(dt, np.integer):
    raise ValueError(f"{what} expects integer token ids, got dtype {dt}")
  if max_len is not None and shape[1] > max_len:
    raise ValueError(f"{what}: sequence length {shape[1]} exceeds max_position_embeddings "
                     f"{max_len}")
  if not isinstance(ids, jax.core.Tracer):
    a = np.asarray(ids)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= vocab_size:
      bad = lo if lo < 0 else hi
      raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab_size})")
  return jnp.asarray(ids, jnp.int32)


def _softmax_f32(scores):
  return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


class _Dense(nn.Module):
  """y = x @ kernel (+ bias): kernel [in, out], as torch `Linear.weight.T`."""
  features: int
  use_bias: bool
  dtype: Any
  std: float = 0.02

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.normal(self.std), (x.shape[-1], self.features),
                   self.dtype)
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), k)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
    return y


class _Embed(nn.Module):
  num: int
  features: int
  dtype: Any
  name_: str = "embedding"

  @nn.compact
  def __call__(self, ids):
    table = self.param(self.name_, nn.initializers.normal(1.0), (self.num, self.features),
                       self.dtype)
    return jnp.take(table, ids, axis=0)


# --------------------------------------------------------------------------- T5
def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """T5's bidirectional relative-position bucket [q_len, k_len] (int32) of
  relative position key - query: half the buckets per sign, half of each
  half exact, the rest logarithmic up to max_distance (static, numpy)."""
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  half = num_buckets // 2
  out = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  exact = half // 2
  with np.errstate(divide="ignore"):
    # float32 log as torch computes it, truncated toward zero like `.to(long)`.
    ratio = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(exact))
    ratio = ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
  large = np.minimum(exact + ratio.astype(np.int64), half - 1)
  out = out + np.where(rel < exact, rel, large)
  return out.astype(np.int32)


class _RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale * y.astype(self.dtype)


class _T5Attention(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x, bias):
    c, dt = self.cfg, as_dtype(self.cfg.dtype)
    b, n, _ = x.shape
    std = c.d_model ** -0.5
    q = _Dense(c.inner_dim, False, dt, std, name="q")(x).reshape(b, n, c.num_heads, c.d_kv)
    k = _Dense(c.inner_dim, False, dt, std, name="k")(x).reshape(b, n, c.num_heads, c.d_kv)
    v = _Dense(c.inner_dim, False, dt, std, name="v")(x).reshape(b, n, c.num_heads, c.d_kv)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = _softmax_f32(scores + bias).astype(dt)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, c.inner_dim)
    return _Dense(c.d_model, False, dt, c.inner_dim ** -0.5, name="o")(out)


class _T5FFN(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x):
    c, dt = self.cfg, as_dtype(self.cfg.dtype)
    gate = _Dense(c.d_ff, False, dt, c.d_model ** -0.5, name="wi_0")(x)
    lin = _Dense(c.d_ff, False, dt, c.d_model ** -0.5, name="wi_1")(x)
    h = jax.nn.gelu(gate, approximate=True) * lin
    return _Dense(c.d_model, False, dt, c.d_ff ** -0.5, name="wo")(h)


class _T5Block(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x, bias):
    c, dt = self.cfg, as_dtype(self.cfg.dtype)
    x = x + _T5Attention(c, name="attn")(_RMSNorm(c.layer_norm_epsilon, dt, name="attn_norm")(x),
                                          bias)
    return x + _T5FFN(c, name="ffn")(_RMSNorm(c.layer_norm_epsilon, dt, name="ffn_norm")(x))


class T5Module(nn.Module):
  """ids [B, L] -> last hidden state [B, L, d_model] (config dtype)."""
  cfg: T5Config

  @nn.compact
  def __call__(self, ids):
    c, dt = self.cfg, as_dtype(self.cfg.dtype)
    n = ids.shape[1]
    x = _Embed(c.vocab_size, c.d_model, dt, name="embed")(ids)
    buckets = relative_position_buckets(n, n, c.relative_attention_num_buckets,
                                        c.relative_attention_max_distance)
    table = _Embed(c.relative_attention_num_buckets, c.num_heads, dt, name="rel_bias")(
        jnp.asarray(buckets))                                         # [q, k, H]
    bias = jnp.transpose(table, (2, 0, 1))[None].astype(jnp.float32)  # [1, H, q, k]
    for i in range(c.num_layers):
      x = _T5Block(c, name=f"layers_{i}")(x, bias)
    return _RMSNorm(c.layer_norm_epsilon, dt, name="final_norm")(x)


def t5_init(cfg: T5Config, rng) -> dict:
  """Random T5 encoder parameters (config dtype)."""
  return T5Module(cfg).init(rng, jnp.zeros((1, 2), jnp.int32))["params"]


def t5_encode(params, cfg: T5Config, ids) -> jax.Array:
  """Token ids [B, L] -> T5 last hidden state [B, L, d_model] (config dtype).
  No attention mask: every position attends to every position, as in FLUX."""
  ids = _check_ids(ids, cfg.vocab_size, "t5_encode")
  return T5Module(cfg).apply({"params": params}, ids)


# --------------------------------------------------------------------------- CLIP
class _LayerNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), self.dtype)
    bias = self.param("bias", nn.initializers.zeros, (d,), self.dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _activation(name: str, x):
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  return jax.nn.gelu(x, approximate=True)


class _ClipAttention(nn.Module):
  cfg: ClipTextConfig

  @nn.compact
  def __call__(self, x, mask):
    c, dt = self.cfg, as_dtype(self.cfg.dtype)
    b, n, d = x.shape
    hd = d // c.num_heads
    std = d ** -0.5
    q = _Dense(d, True, dt, std, name="q")(x).reshape(b, n, c.num_heads, hd)
    k = _Dense(d, True, dt, std, name="k")(x).reshape(b, n, c.num_heads, hd)
    v = _Dense(d, True, dt, std, name="v")(x).reshape(b, n, c.num_heads, hd)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * (hd ** -0.5), -jnp.inf)
    probs = _softmax_f32(scores).astype(dt)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
    return _Dense(d, True, dt, std, name="o")(out)


class _ClipMLP(nn.Module):
  cfg: ClipTextConfig

  @nn.compact
  def __call__(self, x):
    c, dt = self.cfg, as_dtype(self.cfg.dtype)
    h = _Dense(c.intermediate_size, True, dt, c.hidden_size ** -0.5, name="fc1")(x)
    h = _activation(c.hidden_act, h)
    return _Dense(c.hidden_size, True, dt, c.intermediate_size ** -0.5, name="fc2")(h)


class _ClipLayer(nn.Module):
  cfg: ClipTextConfig

  @nn.compact
  def __call__(self, x, mask):
    c, dt = self.cfg, as_dtype(self.cfg.dtype)
    x = x + _ClipAttention(c, name="attn")(_LayerNorm(c.layer_norm_eps, dt, name="ln_1")(x), mask)
    return x + _ClipMLP(c, name="mlp")(_LayerNorm(c.layer_norm_eps, dt, name="ln_2")(x))


class ClipTextModule(nn.Module):
  """ids [B, L] -> final-normed hidden states [B, L, D] (config dtype)."""
  cfg: ClipTextConfig

  @nn.compact
  def __call__(self, ids):
    c, dt = self.cfg, as_dtype(self.cfg.dtype)
    n = ids.shape[1]
    x = _ClipEmbed(c, name="embed")(ids)
    mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
    for i in range(c.num_layers):
      x = _ClipLayer(c, name=f"layers_{i}")(x, mask)
    return _LayerNorm(c.layer_norm_eps, dt, name="final_norm")(x)


class _ClipEmbed(nn.Module):
  cfg: ClipTextConfig

  @nn.compact
  def __call__(self, ids):
    c, dt = self.cfg, as_dtype(self.cfg.dtype)
    tok = self.param("token_embedding", nn.initializers.normal(0.02),
                     (c.vocab_size, c.hidden_size), dt)
    pos = self.param("position_embedding", nn.initializers.normal(0.01),
                     (c.max_position_embeddings, c.hidden_size), dt)
    return jnp.take(tok, ids, axis=0) + pos[None, :ids.shape[1]]


def clip_pool_positions(ids, eos_token_id: int):
  """Where transformers' CLIPTextModel pools: the first position of the
  largest id when eos_token_id == 2 (legacy configs, FLUX's), else the first
  position holding eos_token_id (position 0 if none does, as torch argmax)."""
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


def clip_init(cfg: ClipTextConfig, rng) -> dict:
  """Random CLIP text parameters (config dtype)."""
  return ClipTextModule(cfg).init(rng, jnp.zeros((1, 2), jnp.int32))["params"]


def clip_encode(params, cfg: ClipTextConfig, ids) -> tuple[jax.Array, jax.Array]:
  """Token ids [B, L] (L <= max_position_embeddings) -> (last hidden state
  [B, L, D], pooled [B, D]), both in the config dtype."""
  ids = _check_ids(ids, cfg.vocab_size, "clip_encode", cfg.max_position_embeddings)
  hidden = ClipTextModule(cfg).apply({"params": params}, ids)
  pos = clip_pool_positions(ids, cfg.eos_token_id)
  pooled = jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0]
  return hidden, pooled


# --------------------------------------------------------------------------- numpy faces
class T5Encoder:
  """Numpy face of the T5 encoder: ids [B, L] -> float32 [B, L, d_model]."""

  def __init__(self, cfg: T5Config, params):
    self.cfg = cfg
    self.params = jax.device_put(params)
    self._fn = jax.jit(lambda p, ids: t5_encode(p, cfg, ids))

  def __call__(self, ids) -> np.ndarray:
    ids = _check_ids(np.asarray(ids), self.cfg.vocab_size, "T5Encoder")
    return np.asarray(self._fn(self.params, ids).astype(jnp.float32))


class ClipText:
  """Numpy face of the CLIP text model: ids [B, L] -> (last hidden float32
  [B, L, D], pooled float32 [B, D])."""

  def __init__(self, cfg: ClipTextConfig, params):
    self.cfg = cfg
    self.params = jax.device_put(params)
    self._fn = jax.jit(lambda p, ids: clip_encode(p, cfg, ids))

  def __call__(self, ids) -> tuple[np.ndarray, np.ndarray]:
    ids = _check_ids(np.asarray(ids), self.cfg.vocab_size, "ClipText",
                     self.cfg.max_position_embeddings)
    hidden, pooled = self._fn(self.params, ids)
    return (np.asarray(hidden.astype(jnp.float32)), np.asarray(pooled.astype(jnp.float32)))
