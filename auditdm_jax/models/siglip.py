"""SigLIP vision transformer (So400m/14 and tiny variants), big_vision layout.

Parameter layout (encoder blocks stacked on a leading L axis by nn.scan):

  embedding/kernel                                        [P, P, 3, D]
  embedding/bias                                          [D]
  pos_embedding                                           [1, n, D]
  Transformer/encoderblock/LayerNorm_0/{scale,bias}       [L, D]
  Transformer/encoderblock/MultiHeadDotProductAttention_0/
      {query,key,value}/kernel [L, D, h, hd]   .../bias [L, h, hd]
      out/kernel [L, h, hd, D]                 out/bias [L, D]
  Transformer/encoderblock/LayerNorm_1/{scale,bias}       [L, D]
  Transformer/encoderblock/MlpBlock_0/Dense_0/{kernel [L, D, F], bias [L, F]}
  Transformer/encoderblock/MlpBlock_0/Dense_1/{kernel [L, F, D], bias [L, D]}
  Transformer/encoder_norm/{scale,bias}                   [D]
  head/{kernel [D, out_dim], bias [out_dim]}              (if out_dim)

Images enter as uint8 [B, H, W, 3] (or floats already in [-1, 1]).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


POSEMBS = ("learn", "sincos2d")


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
  image_size: int = 224
  patch_size: int = 14
  width: int = 1152
  depth: int = 27
  mlp_dim: int = 4304
  num_heads: int = 16
  # Linear head on top of the encoder (PaliGemma projects into the LLM width
  # with it); None for no head (Gemma 3 pools and projects elsewhere).
  out_dim: int | None = None
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  # Layers per iteration of the layer scan (1: rolled; depth: fully unrolled,
  # ~1.4x faster training for tiny CPU models, slower compiles for deep ones).
  scan_unroll: int = 1
  # "learn": a learned table `pos_embedding` (SigLIP, PaliGemma); "sincos2d":
  # fixed 2-D sine-cosine embeddings and no parameter (big_vision's option).
  posemb: str = "learn"

  def __post_init__(self):
    problems = []
    if self.posemb not in POSEMBS:
      problems.append(f"posemb must be one of {POSEMBS}, got {self.posemb!r}")
    for name in ("image_size", "patch_size", "width", "depth", "mlp_dim", "num_heads"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v <= 0:
        problems.append(f"{name} must be a positive int, got {v!r}")
    if not problems:
      if self.image_size % self.patch_size:
        problems.append(f"image_size {self.image_size} is not a multiple of "
                        f"patch_size {self.patch_size}")
      if self.width % self.num_heads:
        problems.append(f"width {self.width} is not a multiple of num_heads "
                        f"{self.num_heads}")
    if problems:
      raise ValueError("Invalid SigLIPConfig: " + "; ".join(problems))

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2


def normalize_images(images):
  """uint8 [0, 255] -> float32 [-1, 1]; float inputs are taken as normalised."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  return images.astype(jnp.float32)


def posemb_sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embeddings [1, grid*grid, width]: a
  quarter of the channels each for sin/cos of the column and of the row, at
  geometrically spaced frequencies."""
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need width % 4 == 0, got {width}")
  q = width // 4
  omega = 1.0 / temperature ** (np.arange(q) / max(q - 1, 1))
  row, col = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  x = col.reshape(-1, 1) * omega[None]
  y = row.reshape(-1, 1) * omega[None]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


def _linear_resize_axis(x: np.ndarray, new: int, axis: int) -> np.ndarray:
  """Corner-aligned linear interpolation along one axis (what
  scipy.ndimage.zoom(order=1) does, the big_vision convention)."""
  old = x.shape[axis]
  if new == old:
    return x
  src = np.arange(new) * ((old - 1) / (new - 1)) if new > 1 else np.zeros(1)
  lo = np.clip(np.floor(src).astype(int), 0, old - 1)
  hi = np.clip(lo + 1, 0, old - 1)
  w = (src - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  return np.take(x, lo, axis=axis) * (1 - w) + np.take(x, hi, axis=axis) * w


def resample_posemb(posemb: np.ndarray, new_grid: int) -> np.ndarray:
  """Resizes learned position embeddings [1, g*g, D] to a new_grid^2 grid.

  Used when a checkpoint trained at one resolution is loaded at another (e.g.
  PaliGemma 224 -> 448): the embeddings are viewed as a g x g image and
  resized with corner-aligned bilinear interpolation.
  """
  posemb = np.asarray(posemb)
  n, d = posemb.shape[-2:]
  old_grid = int(round(np.sqrt(n)))
  if old_grid * old_grid != n:
    raise ValueError(f"position embedding with {n} entries is not a square grid")
  if old_grid == new_grid:
    return posemb
  grid = posemb.reshape(old_grid, old_grid, d).astype(np.float64)
  grid = _linear_resize_axis(_linear_resize_axis(grid, new_grid, 0), new_grid, 1)
  return grid.reshape(1, new_grid * new_grid, d).astype(posemb.dtype)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="Dense_0")(x)
    x = nn.gelu(x, approximate=True)
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="Dense_1")(x)


class SelfAttention(nn.Module):
  num_heads: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    hd = d // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, hd), dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k,
                        preferred_element_type=jnp.float32) * (hd ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype,
                           param_dtype=self.param_dtype, name="out")(out)


class EncoderBlock(nn.Module):
  cfg: SigLIPConfig

  @nn.compact
  def __call__(self, x, _):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    ln = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=dt,  # noqa: E731
                                   param_dtype=pdt, name=name)
    x = x + SelfAttention(cfg.num_heads, dt, pdt,
                          name="MultiHeadDotProductAttention_0")(ln("LayerNorm_0")(x))
    x = x + MlpBlock(cfg.mlp_dim, dt, pdt, name="MlpBlock_0")(ln("LayerNorm_1")(x))
    return x, None


class Encoder(nn.Module):
  cfg: SigLIPConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    block = EncoderBlock
    if cfg.remat_policy != "none":
      block = nn.remat(EncoderBlock, prevent_cse=False,
                       policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    x, _ = nn.scan(block, variable_axes={"params": 0},
                   split_rngs={"params": True}, in_axes=nn.broadcast,
                   length=cfg.depth, unroll=cfg.scan_unroll)(cfg, name="encoderblock")(x, None)
    return nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                        param_dtype=jnp.dtype(cfg.param_dtype),
                        name="encoder_norm")(x)


class SigLIP(nn.Module):
  """images [B, H, W, 3] -> tokens [B, num_patches, out_dim or width]."""

  cfg: SigLIPConfig

  @nn.compact
  def __call__(self, images):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"images must be [B, {cfg.image_size}, {cfg.image_size}, 3],"
                       f" got {tuple(images.shape)}")
    x = normalize_images(images).astype(dt)
    b, p, g = x.shape[0], cfg.patch_size, cfg.grid
    # Non-overlapping patches as one einsum (equivalent to a stride-P conv).
    patches = x.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    emb = PatchEmbed(cfg, name="embedding")(patches)
    emb = emb.reshape(b, g * g, cfg.width)
    if cfg.posemb == "sincos2d":
      pos = jnp.asarray(posemb_sincos_2d(g, cfg.width))
    else:
      pos = self.param("pos_embedding", nn.initializers.normal(stddev=cfg.width ** -0.5),
                       (1, g * g, cfg.width), pdt)
    x = emb + pos.astype(dt)
    x = Encoder(cfg, name="Transformer")(x)
    if cfg.out_dim:
      x = nn.Dense(cfg.out_dim, dtype=dt, param_dtype=pdt, name="head")(x)
    return x


class PatchEmbed(nn.Module):
  """Parameters named like a flax Conv (kernel [P, P, 3, D], bias [D])."""

  cfg: SigLIPConfig

  @nn.compact
  def __call__(self, patches):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    p = cfg.patch_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                        (p, p, 3, cfg.width), pdt)
    bias = self.param("bias", nn.initializers.zeros_init(), (cfg.width,), pdt)
    return jnp.einsum("BghpqC,pqCD->BghD", patches, kernel.astype(dt)) + bias.astype(dt)
