"""The Gemma decoder: one module for Gemma 2 and Gemma 3 text towers.

Einsum axis names used throughout:
  B batch, T query length, S key/value length, N query heads, K key/value
  heads, G query heads per key/value head, H head dim, D model width,
  F MLP hidden width, V vocabulary, L layers.

Parameter layout (per-layer arrays are stacked on a leading L axis because the
layers run under `nn.scan`; names follow big_vision / the gemma library):

  embedder/input_embedding                     [V, D]
  embedder/mm_soft_embedding_norm/scale        [Dv]        (Gemma 3 VLM only)
  embedder/mm_input_projection/w               [Dv, D]     (Gemma 3 VLM only)
  layers/pre_attention_norm/scale              [L, D]
  layers/attn/q_einsum/w                       [L, N, D, H]
  layers/attn/kv_einsum/w                      [L, 2, K, D, H]
  layers/attn/query_norm/scale                 [L, H]      (qk_norm only)
  layers/attn/key_norm/scale                   [L, H]      (qk_norm only)
  layers/attn/attn_vec_einsum/w                [L, N, H, D]
  layers/post_attention_norm/scale             [L, D]      (post_norms only)
  layers/pre_ffw_norm/scale                    [L, D]
  layers/mlp/gating_einsum                     [L, 2, D, F]
  layers/mlp/linear                            [L, F, D]
  layers/post_ffw_norm/scale                   [L, D]      (post_norms only)
  final_norm/scale                             [D]

Local (sliding-window) and global layers share parameter shapes, so a model
mixing them (Gemma 2: alternating; Gemma 3: 5 local : 1 global) still runs as
one `nn.scan`: each layer receives its `is_local` flag as a scanned input and
selects its mask and RoPE table with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax.models.logical import constrain

# A large negative logit for masked attention entries (finite, so fully masked
# rows of padding queries give a uniform distribution instead of NaNs).
BIG_NEG = -2.3819763e38

ATTENTION_TYPES = ("global", "local")


@struct.dataclass
class GemmaOutput:
  """What `Gemma.__call__` returns (as gemma's `Output`, gemma/gm/nn/_transformer.py),
  and so what the VLMs (PaliGemma, Gemma3VLM) return: their LLM's output over
  the whole sequence, whatever the flags, so no caller unpacks a tuple whose
  shape depends on them.

  logits: float32 [B, T, V]; None when the call asked for `return_hidden`.
  hidden: the final-normed hidden states [B, T, D].
  kv: (k, v), each [L, B, T, K, H], when `return_kv` (a prefill), else None.
  """

  logits: Any
  hidden: Any
  kv: Any = None


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Hyper-parameters of a Gemma 2 / Gemma 3 decoder."""

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  vocab_size: int
  norm_eps: float = 1e-6
  # Gemma 2 and 3 normalise the outputs of attention and MLP too.
  post_norms: bool = True
  # Gemma 3: RMSNorm on queries and keys (per head) before RoPE.
  qk_norm: bool = False
  # Queries are scaled by query_pre_attn_scalar ** -0.5; None means head_dim
  # (Gemma 2 27B and Gemma 3 27B use width / num_heads instead).
  query_pre_attn_scalar: float | None = None
  attn_logits_softcap: float | None = None
  final_logits_softcap: float | None = None
  # Layer types cycle through this pattern: ("local", "global") for Gemma 2,
  # ("local",) * 5 + ("global",) for Gemma 3, ("global",) for no windows.
  attention_pattern: tuple[str, ...] = ("global",)
  sliding_window: int | None = None
  rope_base_local: float = 10_000.0
  rope_base_global: float = 10_000.0
  # Linear RoPE scaling: positions are divided by this factor.
  rope_scale_local: float = 1.0
  rope_scale_global: float = 1.0
  # Width of the vision features that the embedder projects into the text
  # stream (Gemma 3 VLM); None for a text-only decoder or for PaliGemma, where
  # the vision tower's own head does the projection.
  vision_proj_dim: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  # Layers per iteration of the layer scan (1: rolled; depth: fully unrolled,
  # ~1.4x faster training for tiny CPU models, slower compiles for deep ones).
  scan_unroll: int = 1

  def __post_init__(self):
    problems = []
    for name in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads",
                 "head_dim", "vocab_size"):
      if not isinstance(getattr(self, name), (int, np.integer)) or getattr(self, name) <= 0:
        problems.append(f"{name} must be a positive int, got {getattr(self, name)!r}")
    if not problems and self.num_heads % self.num_kv_heads:
      problems.append(f"num_heads ({self.num_heads}) must be a multiple of "
                      f"num_kv_heads ({self.num_kv_heads})")
    if not problems and self.head_dim % 2:
      problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
    bad = [t for t in self.attention_pattern if t not in ATTENTION_TYPES]
    if bad or not self.attention_pattern:
      problems.append(f"attention_pattern entries must be in {ATTENTION_TYPES}, "
                      f"got {self.attention_pattern!r}")
    if "local" in self.attention_pattern and not self.sliding_window:
      problems.append("attention_pattern has local layers but sliding_window "
                      f"is {self.sliding_window!r}")
    if self.remat_policy != "none" and not hasattr(jax.checkpoint_policies, self.remat_policy):
      problems.append(f"unknown remat_policy {self.remat_policy!r}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        problems.append(f"{name} {getattr(self, name)!r} is not a dtype")
    if problems:
      raise ValueError("Invalid GemmaConfig: " + "; ".join(problems))
    # Tuples survive JSON round trips as lists; normalise.
    object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))

  @property
  def layer_types(self) -> tuple[str, ...]:
    pat = self.attention_pattern
    return tuple(pat[i % len(pat)] for i in range(self.depth))

  @property
  def query_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return float(scalar) ** -0.5


# ----------------------------------------------------------------------------
# Small pure helpers.
# ----------------------------------------------------------------------------


def rms_norm(x, scale, eps: float = 1e-6):
  """Gemma RMSNorm: computed in float32, scaled by (1 + scale)."""
  x32 = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  y = x32 * jax.lax.rsqrt(var + eps) * (1.0 + scale.astype(jnp.float32))
  return y.astype(x.dtype)


def rope_tables(positions, head_dim: int, base: float, scale: float = 1.0):
  """Returns (sin, cos), float32 [B, T, head_dim // 2], for int positions [B, T]."""
  half = head_dim // 2
  inv_freq = 1.0 / (base ** (np.arange(0, half, dtype=np.float64) * 2.0 / head_dim))
  inv_freq = jnp.asarray(inv_freq / scale, jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x, sin, cos):
  """Rotates the two halves of x [B, T, N, H] by tables [B, T, H/2]."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def make_attn_mask(input_mask, mask_ar):
  """Prefix-LM mask [B, T, T] from input_mask [B, T] and mask_ar [B, T].

  mask_ar[t] = 1 starts a new causal step at t: token i may attend to token j
  iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]. All-zero mask_ar over a span
  (the prefix) makes it bidirectional; all-ones is fully causal. Padding
  (input_mask == 0) is neither attended to nor attends.
  """
  input_mask = jnp.asarray(input_mask, jnp.bool_)
  steps = jnp.cumsum(jnp.asarray(mask_ar, jnp.int32), axis=-1)
  causal = steps[:, None, :] <= steps[:, :, None]
  valid = input_mask[:, None, :] & input_mask[:, :, None]
  return causal & valid


def sliding_window_mask(q_positions, kv_positions, window: int):
  """[B, T, S]: True where |q_pos - kv_pos| < window (big_vision / gemma rule)."""
  delta = q_positions[:, :, None] - kv_positions[:, None, :]
  return jnp.abs(delta) < window


def dot_product_attention(q, k, v, mask, softcap: float | None = None):
  """Grouped-query attention. q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] bool."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k,
                      preferred_element_type=jnp.float32)
  if softcap:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask[:, None, None, :, :], logits, BIG_NEG)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
  return out.reshape(b, t, n, h)


def _fan_in_init(in_axes):
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axes, out_axis=-1)


# ----------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],),
                       self.param_dtype)
    return rms_norm(x, scale, self.eps)


class EinsumWeight(nn.Module):
  """Holds one einsum weight under the name `w` (the big_vision/gemma layout)."""

  shape: tuple[int, ...]
  init: Any
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    return self.param("w", self.init, self.shape, self.param_dtype)


class Embedder(nn.Module):
  """Token embedding (shared with the output projection) and, for Gemma 3
  VLMs, the projection of pooled vision features into the text stream."""

  cfg: GemmaConfig

  def setup(self):
    cfg = self.cfg
    self.input_embedding = self.param(
        "input_embedding",
        nn.initializers.normal(stddev=cfg.width ** -0.5),
        (cfg.vocab_size, cfg.width), jnp.dtype(cfg.param_dtype))
    if cfg.vision_proj_dim:
      self.mm_soft_embedding_norm = RMSNorm(
          cfg.norm_eps, jnp.dtype(cfg.param_dtype))
      self.mm_input_projection = EinsumWeight(
          (cfg.vision_proj_dim, cfg.width), _fan_in_init(0),
          jnp.dtype(cfg.param_dtype))

  def encode(self, tokens):
    dtype = jnp.dtype(self.cfg.dtype)
    x = jnp.take(self.input_embedding, tokens, axis=0).astype(dtype)
    return x * jnp.asarray(np.sqrt(self.cfg.width), dtype)

  def encode_vision(self, features):
    dtype = jnp.dtype(self.cfg.dtype)
    x = self.mm_soft_embedding_norm(features.astype(dtype))
    return jnp.einsum("...d,dD->...D", x, self.mm_input_projection().astype(dtype))

  def decode(self, x):
    emb = self.input_embedding.astype(x.dtype)
    return jnp.einsum("BTD,VD->BTV", x, emb, preferred_element_type=jnp.float32)


class Attention(nn.Module):
  """Grouped-query attention with optional QK-norm, RoPE and soft-capping.

  Attends over the call's own keys/values with an explicit mask and also
  returns them (a prefill fills the KV cache with them); incremental decoding
  is `decode_step` below.
  """

  cfg: GemmaConfig

  def setup(self):
    cfg = self.cfg
    pdtype = jnp.dtype(cfg.param_dtype)
    n, k, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.width, cfg.head_dim
    self.q_einsum = EinsumWeight((n, d, h), _fan_in_init(1), pdtype)
    self.kv_einsum = EinsumWeight((2, k, d, h), _fan_in_init(2), pdtype)
    self.attn_vec_einsum = EinsumWeight((n, h, d), _fan_in_init((0, 1)), pdtype)
    if cfg.qk_norm:
      self.query_norm = RMSNorm(cfg.norm_eps, pdtype)
      self.key_norm = RMSNorm(cfg.norm_eps, pdtype)

  def _qkv(self, x, sin, cos):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    q = jnp.einsum("BTD,NDH->BTNH", x, self.q_einsum().astype(dtype))
    k, v = jnp.einsum("BSD,CKDH->CBSKH", x, self.kv_einsum().astype(dtype))
    if cfg.qk_norm:
      q, k = self.query_norm(q), self.key_norm(k)
    q = apply_rope(q, sin, cos) * jnp.asarray(cfg.query_scale, dtype)
    k = apply_rope(k, sin, cos)
    q = constrain(q, "batch", "seq", "heads", None)
    k = constrain(k, "batch", "seq", "kv_heads", None)
    v = constrain(v, "batch", "seq", "kv_heads", None)
    return q, k, v

  def _out(self, encoded):
    return jnp.einsum("BTNH,NHD->BTD", encoded,
                      self.attn_vec_einsum().astype(jnp.dtype(self.cfg.dtype)))

  def __call__(self, x, sin, cos, mask):
    q, k, v = self._qkv(x, sin, cos)
    out = dot_product_attention(q, k, v, mask, self.cfg.attn_logits_softcap)
    return self._out(out), (k, v)


@jax.checkpoint
def gated_gelu(gate, up):
  """gelu_tanh(gate) * up, the gated MLP's activation. Checkpointed: the
  backward pass keeps only `gate` and `up` and recomputes the activation,
  where autodiff would keep ~6 [B, T, F] intermediates of the tanh
  approximation per layer (under a layer scan, stacked over the layers and
  read back through dynamic slices: ~40% of a CPU training step)."""
  return nn.gelu(gate, approximate=True) * up


@jax.custom_vjp
def mlp_dense(x, w):
  """einsum("BTD,DF->BTF", x, w) whose weight gradient is written as
  x^T dy (contracting B, T). For autodiff's form XLA:CPU transposes dy, the
  wide [B*T, F] operand, where this one transposes x [B*T, D]: a GRPO step of
  a width-512, MLP-2048 Gemma 3 on CPU 8.4 -> 6.9 s (bench/README.md). The
  gradients equal autodiff's up to float summation order."""
  return jnp.einsum("BTD,DF->BTF", x, w)


def _mlp_dense_fwd(x, w):
  return mlp_dense(x, w), (x, w)


def _mlp_dense_bwd(res, dy):
  x, w = res
  return (jnp.einsum("BTF,DF->BTD", dy, w).astype(x.dtype),
          jnp.einsum("BTD,BTF->DF", x, dy).astype(w.dtype))


mlp_dense.defvjp(_mlp_dense_fwd, _mlp_dense_bwd)


class FeedForward(nn.Module):
  cfg: GemmaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    w_gating = self.param("gating_einsum", _fan_in_init(1),
                          (2, cfg.width, cfg.mlp_dim), pdtype).astype(dtype)
    w_linear = self.param("linear", _fan_in_init(0),
                          (cfg.mlp_dim, cfg.width), pdtype).astype(dtype)
    gate = mlp_dense(x, w_gating[0])
    up = mlp_dense(x, w_gating[1])
    hidden = constrain(gated_gelu(gate, up), "batch", "seq", "mlp")
    return mlp_dense(hidden, w_linear)


class Block(nn.Module):
  """One decoder layer: pre-norm attention and MLP, optional post-norms."""

  cfg: GemmaConfig

  def setup(self):
    cfg = self.cfg
    pdtype = jnp.dtype(cfg.param_dtype)
    self.pre_attention_norm = RMSNorm(cfg.norm_eps, pdtype)
    self.attn = Attention(cfg)
    self.pre_ffw_norm = RMSNorm(cfg.norm_eps, pdtype)
    self.mlp = FeedForward(cfg)
    if cfg.post_norms:
      self.post_attention_norm = RMSNorm(cfg.norm_eps, pdtype)
      self.post_ffw_norm = RMSNorm(cfg.norm_eps, pdtype)

  def _finish(self, x, h):
    if self.cfg.post_norms:
      h = self.post_attention_norm(h)
    x = x + h
    h = self.mlp(self.pre_ffw_norm(x))
    if self.cfg.post_norms:
      h = self.post_ffw_norm(h)
    return constrain(x + h, "batch", "seq", "embed")

  def __call__(self, x, is_local, ctx, return_kv: bool = False):
    """Scan body: (carry x, scanned is_local flag, broadcast ctx, static
    return_kv) -> (x, (k, v) or None)."""
    x = constrain(x, "batch", "seq", "embed")
    mask = jnp.where(is_local, ctx["mask_local"], ctx["mask_global"])
    sin = jnp.where(is_local, ctx["sin_local"], ctx["sin_global"])
    cos = jnp.where(is_local, ctx["cos_local"], ctx["cos_global"])
    h, kv = self.attn(self.pre_attention_norm(x), sin, cos, mask)
    return self._finish(x, h), (kv if return_kv else None)


class Gemma(nn.Module):
  """Gemma 2 / Gemma 3 decoder over already-embedded inputs.

  `__call__(x, positions, mask)` runs the layers on embeddings x [B, T, D]
  (build them with `embed_tokens` / `embed_vision`) at integer positions
  [B, T] under a boolean attention mask [B, T, T]. Sliding-window layers
  further restrict the mask to |q_pos - kv_pos| < sliding_window, except for
  the pairs marked in `window_exempt` [B, T, T] (PaliGemma's bidirectional
  prefix, as in the transformers reference).

  Returns a `GemmaOutput`: the logits (unless `return_hidden`), the final
  hidden states, and the layers' (k, v) when `return_kv` (a prefill).
  Incremental decoding runs through `models/decode.py`'s `decode_step`.
  """

  cfg: GemmaConfig

  def setup(self):
    cfg = self.cfg
    self.embedder = Embedder(cfg)
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, prevent_cse=False, static_argnums=(4,),
                       policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=cfg.depth, unroll=cfg.scan_unroll,
    )(cfg)
    self.final_norm = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.param_dtype))

  def embed_tokens(self, tokens):
    return self.embedder.encode(tokens)

  def embed_vision(self, features):
    return self.embedder.encode_vision(features)

  def logits(self, hidden):
    logits = self.embedder.decode(hidden)
    cap = self.cfg.final_logits_softcap
    if cap:
      logits = jnp.tanh(logits / cap) * cap
    return constrain(logits, "batch", "seq", "vocab")

  def head(self, x):
    """Final norm and logits of the last layer's output."""
    return self.logits(self.final_norm(x))

  def __call__(self, x, positions, mask, window_exempt=None, return_kv: bool = False,
               return_hidden: bool = False):
    cfg = self.cfg
    x = x.astype(jnp.dtype(cfg.dtype))
    b, t = x.shape[:2]
    if mask.shape != (b, t, t) or positions.shape != (b, t):
      raise ValueError(f"attention mask {mask.shape} / positions {positions.shape} do "
                       f"not fit inputs of shape {x.shape}")
    is_local = jnp.asarray([lt == "local" for lt in cfg.layer_types])
    mask = mask.astype(jnp.bool_)
    mask_local = mask
    if cfg.sliding_window:
      mask_local = mask & sliding_window_mask(positions, positions, cfg.sliding_window)
      if window_exempt is not None:
        mask_local = mask_local | (mask & window_exempt)
    sin_l, cos_l = rope_tables(positions, cfg.head_dim, cfg.rope_base_local,
                               cfg.rope_scale_local)
    sin_g, cos_g = rope_tables(positions, cfg.head_dim, cfg.rope_base_global,
                               cfg.rope_scale_global)
    ctx = dict(mask_global=mask, mask_local=mask_local, sin_local=sin_l,
               cos_local=cos_l, sin_global=sin_g, cos_global=cos_g)
    x, kv = self.layers(x, is_local, ctx, return_kv)
    x = self.final_norm(x)
    return GemmaOutput(logits=None if return_hidden else self.logits(x), hidden=x, kv=kv)
