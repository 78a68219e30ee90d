"""The FLUX.1 transformer (dev / Kontext dev): an MMDiT over packed latent
tokens and T5 text tokens, numerically equal to diffusers'
`FluxTransformer2DModel` (return_dict=False)[0].

Forward pass (B batch, N image tokens, T text tokens, D = num_heads*head_dim):

  x   = x_embedder(hidden_states)                       [B, N, D]
  txt = context_embedder(encoder_hidden_states)         [B, T, D]
  temb = MLP(sinusoid_256(1000 t)) [+ MLP(sinusoid_256(1000 g))] + MLP(pooled)
  rope over ids = [txt_ids; img_ids]  (3 axes (t, h, w), theta 10000,
        interleaved pairs rotated by position * 1/theta^(2j/axis_dim))
  num_layers double-stream blocks (separate weights per stream, one joint
        attention over [txt; img], AdaLayerNormZero modulation, gelu-tanh MLP)
  num_single_layers single-stream blocks over [txt; img] (AdaLayerNormZeroSingle,
        attention and MLP in parallel, proj_out on their concatenation)
  out = proj_out(AdaLayerNormContinuous(img part, temb))  [B, N, out]

Parameter layout (Linear kernels are [in, out]; the per-block arrays are
stacked on a leading L axis because the blocks run under `nn.scan`; names
follow diffusers' modules):

  x_embedder/{kernel [C, D], bias [D]}
  context_embedder/{kernel [J, D], bias [D]}
  time_text_embed/timestep_embedder/linear_1/{kernel [256, D], bias}
  time_text_embed/timestep_embedder/linear_2/{kernel [D, D], bias}
  time_text_embed/guidance_embedder/...          (guidance_embeds only)
  time_text_embed/text_embedder/linear_1/{kernel [P, D], bias}, linear_2
  transformer_blocks/                                        (L = num_layers)
      norm1, norm1_context/{kernel [L, D, 6D], bias}   (shift, scale, gate) x (attn, mlp)
      to_q, to_k, to_v, add_q_proj, add_k_proj, add_v_proj/{kernel [L, D, D], bias}
      norm_q, norm_k, norm_added_q, norm_added_k/scale [L, H]
      to_out, to_add_out/{kernel [L, D, D], bias}
      ff_in, ff_context_in/{kernel [L, D, M], bias}
      ff_out, ff_context_out/{kernel [L, M, D], bias}
  single_transformer_blocks/                                 (L = num_single_layers)
      norm/{kernel [L, D, 3D], bias}                   (shift, scale, gate)
      to_q, to_k, to_v/{kernel [L, D, D], bias};  proj_mlp/{kernel [L, D, M], bias}
      norm_q, norm_k/scale [L, H]
      proj_out/{kernel [L, D + M, D], bias}
  norm_out/{kernel [D, 2D], bias}                      (scale, shift: diffusers order)
  proj_out/{kernel [D, out], bias}

Two checkpoint layouts load into it (`diffusion/ckpt/flux.py`): diffusers'
(`transformer/` directory) and Black Forest Labs' single file
(flux1-dev.safetensors, flux1-kontext-dev.safetensors), whose fused qkv /
linear1 are split and whose final adaLN (shift, scale) is swapped into
diffusers' (scale, shift).

Precision: parameters and activations in `cfg.dtype`; layer norms, RMS norms,
modulation, RoPE, the sinusoidal embedding and softmax in float32.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax.diffusion.common import dtype_name

__all__ = ["FluxConfig", "FLUX1_DEV", "FluxTransformer", "init_params", "apply",
           "Transformer", "rope_tables", "timestep_embedding"]

ROPE_THETA = 10_000.0
TIME_PROJ_DIM = 256          # sinusoidal channels of the timestep / guidance projection
TIME_FACTOR = 1000.0         # diffusers and BFL multiply t and guidance by 1000
_EPS = 1e-6                  # every LayerNorm / RMSNorm in the model
# axes_dims_rope of the published FLUX.1 models by head dim (BFL files do not
# record it).
KNOWN_AXES = {128: (16, 56, 56)}
# Query rows per attention chunk (see `_attention`); read at trace time.
ATTN_Q_CHUNK = 1024


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  """Shapes of a FLUX.1 transformer (defaults: FLUX.1 dev / Kontext dev)."""

  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  num_heads: int = 24
  head_dim: int = 128
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = True
  axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
  mlp_ratio: float = 4.0
  dtype: str = "bfloat16"          # compute / param dtype

  def __post_init__(self):
    problems = []
    for name in ("in_channels", "num_heads", "head_dim", "joint_attention_dim",
                 "pooled_projection_dim"):
      v = getattr(self, name)
      if not _is_int(v) or v <= 0:
        problems.append(f"{name} must be a positive int, got {v!r}")
    for name in ("num_layers", "num_single_layers"):
      v = getattr(self, name)
      if not _is_int(v) or v < 0:
        problems.append(f"{name} must be a non-negative int, got {v!r}")
    if self.out_channels is not None and (not _is_int(self.out_channels)
                                          or self.out_channels <= 0):
      problems.append(f"out_channels must be None or a positive int, got {self.out_channels!r}")
    if not isinstance(self.guidance_embeds, (bool, np.bool_)):
      problems.append(f"guidance_embeds must be a bool, got {self.guidance_embeds!r}")
    axes = self.axes_dims_rope
    if (not isinstance(axes, (tuple, list)) or not axes
        or not all(_is_int(a) and a > 0 and a % 2 == 0 for a in axes)):
      problems.append(f"axes_dims_rope must be a sequence of positive even ints, got {axes!r}")
    elif _is_int(self.head_dim) and sum(axes) != self.head_dim:
      problems.append(f"axes_dims_rope {tuple(axes)} must sum to head_dim {self.head_dim}")
    ratio = self.mlp_ratio
    if not isinstance(ratio, (int, float, np.floating)) or isinstance(ratio, bool) or ratio <= 0:
      problems.append(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
    dtype = str(self.dtype)
    try:
      dtype = dtype_name(self.dtype)
    except ValueError as e:
      problems.append(str(e))
    if problems:
      raise ValueError("Invalid FluxConfig: " + "; ".join(problems))
    object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in axes))
    object.__setattr__(self, "dtype", dtype)
    object.__setattr__(self, "guidance_embeds", bool(self.guidance_embeds))

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def out(self) -> int:
    return self.out_channels or self.in_channels

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any], dtype: str = "bfloat16") -> FluxConfig:
    """From a diffusers `transformer/config.json` dict (keys starting with '_'
    are metadata and skipped; a missing key takes diffusers' default, so a
    config without `guidance_embeds` is the schnell-style False)."""
    if not isinstance(d, Mapping):
      raise ValueError(f"FluxConfig.from_diffusers: expected a dict, got {type(d).__name__}")
    known = {"patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
             "attention_head_dim", "num_attention_heads", "joint_attention_dim",
             "pooled_projection_dim", "guidance_embeds", "axes_dims_rope"}
    unknown = sorted(k for k in d if not str(k).startswith("_") and k not in known)
    if unknown:
      raise ValueError(f"FluxConfig.from_diffusers: unknown field(s) {unknown}")
    patch = d.get("patch_size", 1)
    if patch != 1 or isinstance(patch, bool):
      raise ValueError(f"FluxConfig.from_diffusers: field 'patch_size' must be 1 "
                       f"(FLUX packs 2x2 latent patches outside the transformer), got {patch!r}")
    kw = dict(in_channels=d.get("in_channels", 64), out_channels=d.get("out_channels"),
              num_layers=d.get("num_layers", 19), num_single_layers=d.get("num_single_layers", 38),
              head_dim=d.get("attention_head_dim", 128),
              num_heads=d.get("num_attention_heads", 24),
              joint_attention_dim=d.get("joint_attention_dim", 4096),
              pooled_projection_dim=d.get("pooled_projection_dim", 768),
              guidance_embeds=d.get("guidance_embeds", False),
              axes_dims_rope=d.get("axes_dims_rope", (16, 56, 56)),
              dtype=dtype_name(dtype))
    names = {"head_dim": "attention_head_dim", "num_heads": "num_attention_heads"}
    try:
      return cls(**kw)
    except ValueError as e:
      msg = str(e)
      for ours, theirs in names.items():
        msg = re.sub(rf"\b{ours}\b", f"{ours} ({theirs})", msg)
      raise ValueError(f"FluxConfig.from_diffusers: {msg}") from None


FLUX1_DEV = FluxConfig()


# ----------------------------------------------------------------------------
# Pure helpers.
# ----------------------------------------------------------------------------


def _precision(dtype):
  # float32 configs are parity runs: full-precision matmuls on TPU too.
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def timestep_embedding(t, dim: int = TIME_PROJ_DIM, max_period: float = 10_000.0):
  """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`:
  [cos(t f), sin(t f)] with f_j = max_period^(-j / (dim/2)); float32 [B, dim]."""
  half = dim // 2
  # The exponent rounded to float32 as torch computes it, then exp correctly
  # rounded: within one ulp of diffusers' float32 frequencies (1000 t and
  # 1000 g reach thousands of rad, where an ulp of frequency is ~1e-4 rad).
  expo = (np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half)
  freqs = np.exp(expo.astype(np.float64)).astype(np.float32)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def rope_tables(ids, axes_dims: tuple[int, ...], theta: float = ROPE_THETA):
  """(cos, sin), float32 [S, sum(axes_dims) // 2], for position ids [S, n_axes]:
  axis i contributes axes_dims[i] // 2 frequencies theta^(-2j / axes_dims[i])."""
  pos = jnp.asarray(ids).astype(jnp.float32)
  angles = []
  for i, d in enumerate(axes_dims):
    freqs = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles.append(pos[:, i:i + 1] * jnp.asarray(freqs, jnp.float32)[None])
  angles = jnp.concatenate(angles, axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
  """Rotates interleaved pairs (x[2j], x[2j+1]) of x [B, S, N, H] (float32)
  by tables [S, H/2] (diffusers `apply_rotary_emb(use_real_unbind_dim=-1)`)."""
  b, s, n, h = x.shape
  x = x.astype(jnp.float32).reshape(b, s, n, h // 2, 2)
  x0, x1 = x[..., 0], x[..., 1]
  c, sn = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([x0 * c - x1 * sn, x1 * c + x0 * sn], axis=-1)
  return out.reshape(b, s, n, h)


def _layer_norm(x):
  """LayerNorm without affine parameters, eps 1e-6; float32 out."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _EPS)


def _modulate(x, shift, scale, dtype):
  """LayerNorm(x) * (1 + scale) + shift, in float32; shift/scale [B, D]."""
  y = _layer_norm(x) * (1.0 + scale.astype(jnp.float32)[:, None]) \
      + shift.astype(jnp.float32)[:, None]
  return y.astype(dtype)


def _attention(q, k, v, cos, sin, precision, q_chunk: int | None = None):
  """Joint attention. q, k (already RMS-normed, float32), v: [B, S, N, H];
  cos/sin [S, H/2]. Queries go in chunks of `q_chunk` (default ATTN_Q_CHUNK)
  so the float32 logits held at once are [B, N, q_chunk, S], not [B, N, S, S]
  (Kontext at 1024px has S = 512 + 2 * 4096)."""
  dtype = v.dtype
  b, s, n, h = q.shape
  q = apply_rope(q, cos, sin).astype(dtype)
  k = apply_rope(k, cos, sin).astype(dtype)
  scale = np.float32(h ** -0.5)

  def attend(qc):
    logits = jnp.einsum("BTNH,BSNH->BNTS", qc, k, precision=precision,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * scale, axis=-1).astype(dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", probs, v, precision=precision)

  chunk = q_chunk or ATTN_Q_CHUNK
  if s <= chunk:
    out = attend(q)
  else:
    pieces = -(-s // chunk)
    qp = jnp.pad(q, ((0, 0), (0, pieces * chunk - s), (0, 0), (0, 0)))
    qp = jnp.moveaxis(qp.reshape(b, pieces, chunk, n, h), 1, 0)
    out = jax.lax.map(attend, qp)                       # [pieces, B, chunk, N, H]
    out = jnp.moveaxis(out, 0, 1).reshape(b, pieces * chunk, n, h)[:, :s]
  return out.reshape(b, s, n * h)


# ----------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------


def _dense(cfg: FluxConfig, features: int, name: str) -> nn.Dense:
  dt = jnp.dtype(cfg.dtype)
  return nn.Dense(features, dtype=dt, param_dtype=dt, precision=_precision(dt), name=name)


class RMSNorm(nn.Module):
  """torch.nn.RMSNorm(eps=1e-6) over the last axis; float32 out."""

  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + _EPS)
    return x * scale.astype(jnp.float32)


class MLPEmbedder(nn.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding and
  PixArtAlphaTextProjection(act_fn='silu'); BFL MLPEmbedder)."""

  cfg: FluxConfig

  @nn.compact
  def __call__(self, x):
    x = _dense(self.cfg, self.cfg.width, "linear_1")(x)
    return _dense(self.cfg, self.cfg.width, "linear_2")(nn.silu(x))


class TimeTextEmbed(nn.Module):
  """temb = MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))] + MLP(pooled)."""

  cfg: FluxConfig

  @nn.compact
  def __call__(self, timestep, guidance, pooled):
    dt = jnp.dtype(self.cfg.dtype)
    emb = MLPEmbedder(self.cfg, name="timestep_embedder")(timestep_embedding(timestep).astype(dt))
    if self.cfg.guidance_embeds:
      emb = emb + MLPEmbedder(self.cfg, name="guidance_embedder")(
          timestep_embedding(guidance).astype(dt))
    return emb + MLPEmbedder(self.cfg, name="text_embedder")(pooled)


class DoubleBlock(nn.Module):
  """FluxTransformerBlock: image and text streams with their own weights,
  one attention over [text; image]. Scan body: ((img, txt), ctx) -> ((img, txt), None)."""

  cfg: FluxConfig

  @nn.compact
  def __call__(self, carry, ctx):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
    img, txt = carry
    b, t = txt.shape[0], txt.shape[1]
    temb = nn.silu(ctx["temb"])
    img_mod = jnp.split(_dense(cfg, 6 * d, "norm1")(temb), 6, axis=-1)
    txt_mod = jnp.split(_dense(cfg, 6 * d, "norm1_context")(temb), 6, axis=-1)

    def qkv(x, names, norms):
      q, k, v = (_dense(cfg, d, nm)(x).reshape(b, x.shape[1], n, h) for nm in names)
      q = RMSNorm(dt, name=norms[0])(q)
      k = RMSNorm(dt, name=norms[1])(k)
      return q, k, v

    x_img = _modulate(img, img_mod[0], img_mod[1], dt)
    x_txt = _modulate(txt, txt_mod[0], txt_mod[1], dt)
    iq, ik, iv = qkv(x_img, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
    tq, tk, tv = qkv(x_txt, ("add_q_proj", "add_k_proj", "add_v_proj"),
                     ("norm_added_q", "norm_added_k"))
    attn = _attention(jnp.concatenate([tq, iq], 1), jnp.concatenate([tk, ik], 1),
                      jnp.concatenate([tv, iv], 1), ctx["cos"], ctx["sin"], _precision(dt))
    txt_attn, img_attn = attn[:, :t], attn[:, t:]

    def ff(x, prefix):
      x = nn.gelu(_dense(cfg, cfg.mlp_dim, prefix + "_in")(x), approximate=True)
      return _dense(cfg, d, prefix + "_out")(x)

    img = img + img_mod[2][:, None] * _dense(cfg, d, "to_out")(img_attn)
    img = img + img_mod[5][:, None] * ff(_modulate(img, img_mod[3], img_mod[4], dt), "ff")
    txt = txt + txt_mod[2][:, None] * _dense(cfg, d, "to_add_out")(txt_attn)
    txt = txt + txt_mod[5][:, None] * ff(_modulate(txt, txt_mod[3], txt_mod[4], dt), "ff_context")
    return (img, txt), None


class SingleBlock(nn.Module):
  """FluxSingleTransformerBlock over x = [text; image]: attention and MLP in
  parallel from one modulated input, proj_out on their concatenation.
  Scan body: (x, ctx) -> (x, None)."""

  cfg: FluxConfig

  @nn.compact
  def __call__(self, x, ctx):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
    b, s = x.shape[0], x.shape[1]
    shift, scale, gate = jnp.split(_dense(cfg, 3 * d, "norm")(nn.silu(ctx["temb"])), 3, axis=-1)
    y = _modulate(x, shift, scale, dt)
    q, k, v = (_dense(cfg, d, nm)(y).reshape(b, s, n, h) for nm in ("to_q", "to_k", "to_v"))
    q = RMSNorm(dt, name="norm_q")(q)
    k = RMSNorm(dt, name="norm_k")(k)
    attn = _attention(q, k, v, ctx["cos"], ctx["sin"], _precision(dt))
    mlp = nn.gelu(_dense(cfg, cfg.mlp_dim, "proj_mlp")(y), approximate=True)
    out = _dense(cfg, d, "proj_out")(jnp.concatenate([attn, mlp], axis=-1))
    return x + gate[:, None] * out, None


def _shape_error(name: str, want: str, arr) -> ValueError:
  return ValueError(f"FluxTransformer: {name} must be {want}, got shape {tuple(np.shape(arr))}")


def _check_inputs(cfg: FluxConfig, hidden_states, encoder_hidden_states, pooled_projections,
                  timestep, img_ids, txt_ids, guidance):
  """Static shape checks (trace time); returns (timestep [B], guidance [B] or
  None, img_ids [N, A], txt_ids [T, A])."""
  hs, enc, pooled = hidden_states, encoder_hidden_states, pooled_projections
  if np.ndim(hs) != 3 or np.shape(hs)[-1] != cfg.in_channels:
    raise _shape_error("hidden_states", f"[B, N, in_channels={cfg.in_channels}]", hs)
  b, n = np.shape(hs)[:2]
  if np.ndim(enc) != 3 or np.shape(enc)[-1] != cfg.joint_attention_dim or np.shape(enc)[0] != b:
    raise _shape_error("encoder_hidden_states",
                       f"[B={b}, T, joint_attention_dim={cfg.joint_attention_dim}]", enc)
  t = np.shape(enc)[1]
  if np.shape(pooled) != (b, cfg.pooled_projection_dim):
    raise _shape_error("pooled_projections",
                       f"[B={b}, pooled_projection_dim={cfg.pooled_projection_dim}]", pooled)

  def per_batch(name, v):
    if np.ndim(v) > 1 or np.size(v) not in (1, b):
      raise _shape_error(name, f"a scalar, [1] or [B={b}]", v)
    return jnp.broadcast_to(jnp.reshape(jnp.asarray(v), (-1,)), (b,))

  timestep = per_batch("timestep", timestep)
  if cfg.guidance_embeds:
    if guidance is None:
      raise ValueError("FluxTransformer: guidance is required (the config has "
                       "guidance_embeds=True, as FLUX.1 dev / Kontext dev)")
    guidance = per_batch("guidance", guidance)
  else:
    guidance = None            # a model without guidance_in has no use for it

  axes = len(cfg.axes_dims_rope)

  def ids(name, v, length):
    if np.ndim(v) == 3:        # deprecated [B, S, A] ids: diffusers takes the first
      v = v[0]
    if np.ndim(v) != 2 or np.shape(v) != (length, axes):
      raise _shape_error(name, f"[{length}, {axes}] (or [B, {length}, {axes}])", v)
    return jnp.asarray(v)

  return timestep, guidance, ids("img_ids", img_ids, n), ids("txt_ids", txt_ids, t)


class FluxTransformer(nn.Module):
  """FluxTransformer2DModel.forward(..., return_dict=False)[0], float32 out.

  hidden_states [B, N, in_channels] (packed latents), encoder_hidden_states
  [B, T, joint_attention_dim] (T5), pooled_projections [B, pooled_dim] (CLIP),
  timestep (sigma in [0, 1]) and guidance: scalar, [1] or [B]; img_ids [N, 3],
  txt_ids [T, 3] (or [B, ., 3]: the first is used). guidance is required
  when cfg.guidance_embeds and ignored otherwise.
  """

  cfg: FluxConfig

  def setup(self):
    cfg = self.cfg
    self.x_embedder = _dense(cfg, cfg.width, "x_embedder")
    self.context_embedder = _dense(cfg, cfg.width, "context_embedder")
    self.time_text_embed = TimeTextEmbed(cfg)
    scan = dict(variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=nn.broadcast)
    if cfg.num_layers:
      self.transformer_blocks = nn.scan(DoubleBlock, length=cfg.num_layers, **scan)(cfg)
    if cfg.num_single_layers:
      self.single_transformer_blocks = nn.scan(SingleBlock, length=cfg.num_single_layers,
                                               **scan)(cfg)
    self.norm_out = _dense(cfg, 2 * cfg.width, "norm_out")
    self.proj_out = _dense(cfg, cfg.out, "proj_out")

  def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep,
               img_ids, txt_ids, guidance=None):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    timestep, guidance, img_ids, txt_ids = _check_inputs(
        cfg, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
        txt_ids, guidance)
    t_len = encoder_hidden_states.shape[1]
    img = self.x_embedder(jnp.asarray(hidden_states).astype(dt))
    txt = self.context_embedder(jnp.asarray(encoder_hidden_states).astype(dt))
    # diffusers casts t (and guidance) to the model dtype before the x1000.
    timestep = timestep.astype(dt) * jnp.asarray(TIME_FACTOR, dt)
    if guidance is not None:
      guidance = guidance.astype(dt) * jnp.asarray(TIME_FACTOR, dt)
    temb = self.time_text_embed(timestep, guidance, jnp.asarray(pooled_projections).astype(dt))
    cos, sin = rope_tables(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope)
    ctx = {"temb": temb, "cos": cos, "sin": sin}
    if cfg.num_layers:
      (img, txt), _ = self.transformer_blocks((img, txt), ctx)
    if cfg.num_single_layers:
      x, _ = self.single_transformer_blocks(jnp.concatenate([txt, img], axis=1), ctx)
      img = x[:, t_len:]
    scale, shift = jnp.split(self.norm_out(nn.silu(temb)), 2, axis=-1)
    out = self.proj_out(_modulate(img, shift, scale, dt))
    return out.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Functional face.
# ----------------------------------------------------------------------------


def apply(params, cfg: FluxConfig, hidden_states, encoder_hidden_states, pooled_projections,
          timestep, img_ids, txt_ids, guidance=None):
  """FluxTransformer(cfg) on `params`; float32 [B, N, cfg.out]. Jittable
  with cfg static (`jax.jit(apply, static_argnums=1)`)."""
  return FluxTransformer(cfg).apply({"params": params}, hidden_states, encoder_hidden_states,
                                    pooled_projections, timestep, img_ids, txt_ids, guidance)


def _dummy_inputs(cfg: FluxConfig):
  axes = len(cfg.axes_dims_rope)
  return (jnp.zeros((1, 1, cfg.in_channels)), jnp.zeros((1, 1, cfg.joint_attention_dim)),
          jnp.zeros((1, cfg.pooled_projection_dim)), jnp.zeros((1,)), jnp.zeros((1, axes)),
          jnp.zeros((1, axes)), jnp.ones((1,)) if cfg.guidance_embeds else None)


def init_params(cfg: FluxConfig, rng) -> dict:
  """Random parameters in cfg.dtype (lecun-normal kernels, zero biases,
  unit norm scales), for benchmarks and tiny runs."""
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  model = FluxTransformer(cfg)
  return jax.jit(lambda r: model.init(r, *_dummy_inputs(cfg))["params"])(rng)


def param_shapes(cfg: FluxConfig) -> dict:
  """{path: ShapeDtypeStruct} tree of the parameters, without allocating."""
  model = FluxTransformer(cfg)
  return jax.eval_shape(lambda r: model.init(r, *_dummy_inputs(cfg))["params"],
                        jax.random.PRNGKey(0))


class Transformer:
  """The numpy face: `Transformer(cfg, params)(hidden_states, ...)` with the
  arguments and semantics of diffusers FluxTransformer2DModel.forward(...,
  return_dict=False)[0]; float32 numpy out. One jit of `apply`; it compiles
  once per input shape."""

  def __init__(self, cfg: FluxConfig, params):
    self.cfg = cfg
    self.params = jax.tree.map(jnp.asarray, params)
    self._fn = jax.jit(apply, static_argnums=1)

  def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep,
               img_ids, txt_ids, guidance=None) -> np.ndarray:
    f32 = lambda a: None if a is None else np.asarray(a, np.float32)  # noqa: E731
    if not self.cfg.guidance_embeds:
      guidance = None
    out = self._fn(self.params, self.cfg, f32(hidden_states), f32(encoder_hidden_states),
                   f32(pooled_projections), f32(timestep), f32(img_ids), f32(txt_ids),
                   f32(guidance))
    return np.asarray(jax.device_get(out), np.float32)
