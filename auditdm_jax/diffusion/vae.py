"""The FLUX.1 16-channel autoencoder: diffusers' `AutoencoderKL` in Flax.

Architecture (f = 2 ** (levels - 1) pixels per latent cell; FLUX: 4 levels of
(128, 256, 512, 512) channels, 2 resnets per encoder level, 16 latent
channels, 32 norm groups, f = 8):

  encoder: conv_in 3x3 -> per level: `layers_per_block` resnets, then (all but
           the last level) a stride-2 3x3 conv after zero-padding bottom/right
           by one -> mid block (resnet, single-head spatial self-attention,
           resnet) -> group norm, SiLU, conv_out 3x3 to 2 * latent channels
           (mean, logvar) -> [quant_conv 1x1]; the latent is the mean.
  decoder: [post_quant_conv 1x1] -> conv_in 3x3 -> mid block -> per level from
           the coarsest: `layers_per_block + 1` resnets, then (all but the
           last) nearest x2 upsampling and a 3x3 conv -> group norm, SiLU,
           conv_out 3x3.
  resnet:  x + conv2(silu(gn2(conv1(silu(gn1(x)))))), with a 1x1
           `conv_shortcut` on x when the channel count changes.
  attention: gn -> q, k, v (dense over channels) -> softmax(q k^T / sqrt(C)) v
           -> to_out, plus the input; the H*W cells are the tokens.

Everything is computed NHWC (channels on the lane axis, as TPUs like it);
group norms, softmax and the attention logits run in float32 whatever the
compute dtype. The numpy face `Autoencoder` takes and returns NCHW like
diffusers.

Parameter layout (`init_params`; `diffusion/ckpt/vae.py`: `params_from_diffusers`,
`params_from_bfl`;
conv kernels [kh, kw, in, out], dense kernels [in, out]):

  encoder/conv_in/{kernel,bias}
  encoder/down_blocks_{i}/resnets_{j}/{norm1,norm2}/{scale,bias}
  encoder/down_blocks_{i}/resnets_{j}/{conv1,conv2,conv_shortcut?}/{kernel,bias}
  encoder/down_blocks_{i}/downsample/{kernel,bias}          (i < levels - 1)
  encoder/mid_block/{resnets_0,resnets_1}/...
  encoder/mid_block/attention/group_norm/{scale,bias}       (mid_block_add_attention)
  encoder/mid_block/attention/{to_q,to_k,to_v,to_out}/{kernel,bias}
  encoder/conv_norm_out/{scale,bias}, encoder/conv_out/{kernel,bias}
  quant_conv/{kernel,bias}, post_quant_conv/{kernel,bias}   (when enabled)
  decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_{i}/resnets_{j}/...,
  decoder/up_blocks_{i}/upsample (i < levels - 1), decoder/conv_norm_out,
  decoder/conv_out

Checkpoints (`diffusion/ckpt/vae.py`): a diffusers `vae/` directory (config.json +
diffusion_pytorch_model.safetensors; names such as
`encoder.down_blocks.0.resnets.0.norm1.weight`,
`encoder.mid_block.attentions.0.to_q.weight`) or Black Forest Labs'
`ae.safetensors` (the original LDM names: `encoder.down.0.block.0.norm1.weight`,
`encoder.down.0.downsample.conv`, `encoder.mid.block_1`,
`encoder.mid.attn_1.{norm,q,k,v,proj_out}` as 1x1 convs, `nin_shortcut`,
`norm_out`; the decoder's `up.{k}` counts from the finest level, so diffusers'
`up_blocks.{i}` is BFL's `up.{levels - 1 - i}`).
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

from auditdm_jax.diffusion.common import as_dtype

__all__ = ["AutoencoderConfig", "FLUX1_AE", "Autoencoder", "init_params", "param_shapes",
           "encode", "decode"]

_EPS = 1e-6                   # every group norm of the model
_DTYPES = ("float32", "bfloat16", "float16")
_ATTN_QUERY_CHUNK = 4096      # query rows per attention step (bounds the [N, N] logits)
# FLUX.1's latent statistics (BFL's AutoEncoderParams, the FLUX vae/config.json).
FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Hyper-parameters of an AutoencoderKL (defaults: FLUX.1's)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 16
  norm_num_groups: int = 32
  # Pipelines feed the transformer (mean - shift_factor) * scaling_factor.
  scaling_factor: float = FLUX_SCALING_FACTOR
  shift_factor: float | None = FLUX_SHIFT_FACTOR
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_block_add_attention: bool = True
  dtype: str = "bfloat16"

  def __post_init__(self):
    if isinstance(self.block_out_channels, (list, tuple)):
      object.__setattr__(self, "block_out_channels",
                         tuple(int(c) if _is_int(c) else c for c in self.block_out_channels))
    problems = []
    for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                 "norm_num_groups"):
      v = getattr(self, name)
      if not _is_int(v) or v <= 0:
        problems.append(f"{name} must be a positive int, got {v!r}")
    boc = self.block_out_channels
    if not isinstance(boc, tuple) or not boc or not all(_is_int(c) and c > 0 for c in boc):
      problems.append(f"block_out_channels must be a non-empty tuple of positive ints, got {boc!r}")
    elif _is_int(self.norm_num_groups) and self.norm_num_groups > 0:
      bad = [c for c in boc if c % self.norm_num_groups]
      if bad:
        problems.append(f"block_out_channels {boc} are not all multiples of norm_num_groups "
                        f"{self.norm_num_groups} (offending: {bad})")
    if not _is_num(self.scaling_factor) or not math.isfinite(self.scaling_factor) \
        or self.scaling_factor == 0:
      problems.append(f"scaling_factor must be a finite non-zero number, "
                      f"got {self.scaling_factor!r}")
    if self.shift_factor is not None and (not _is_num(self.shift_factor)
                                          or not math.isfinite(self.shift_factor)):
      problems.append(f"shift_factor must be a finite number or None, got {self.shift_factor!r}")
    for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        problems.append(f"{name} must be a bool, got {getattr(self, name)!r}")
    if str(self.dtype) not in _DTYPES:
      problems.append(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
    if problems:
      raise ValueError("Invalid AutoencoderConfig: " + "; ".join(problems))

  @property
  def scale_factor(self) -> int:
    """Pixels per latent cell along each side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any], dtype: str = "bfloat16") -> AutoencoderConfig:
    """The config of a diffusers `vae/config.json` dict (missing fields take
    AutoencoderKL's own defaults, as diffusers would); anything this
    implementation does not cover is a ValueError naming the field."""
    if not isinstance(d, Mapping):
      raise ValueError(f"vae config must be a dict, got {type(d).__name__}")
    name = d.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(f"vae config field '_class_name' is {name!r}; only AutoencoderKL "
                       f"is supported")
    boc = d.get("block_out_channels", (64,))
    if not isinstance(boc, (list, tuple)):
      raise ValueError(f"vae config field 'block_out_channels' must be a list, got {boc!r}")
    n = len(boc)
    for field, want in (("down_block_types", "DownEncoderBlock2D"),
                        ("up_block_types", "UpDecoderBlock2D")):
      types = d.get(field, (want,))
      if not isinstance(types, (list, tuple)) or len(types) != n or any(t != want for t in types):
        raise ValueError(f"vae config field {field!r} must list {n} x {want!r} (one per "
                         f"block_out_channels entry), got {types!r}")
    act = d.get("act_fn", "silu")
    if act not in ("silu", "swish"):
      raise ValueError(f"vae config field 'act_fn' is {act!r}; only 'silu' is supported")
    for field in ("latents_mean", "latents_std"):
      if d.get(field) is not None:
        raise ValueError(f"vae config field {field!r} is set; per-channel latent statistics "
                         f"are not supported (FLUX uses scaling_factor / shift_factor)")
    kw = dict(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
              block_out_channels=tuple(boc), layers_per_block=d.get("layers_per_block", 1),
              latent_channels=d.get("latent_channels", 4),
              norm_num_groups=d.get("norm_num_groups", 32),
              scaling_factor=d.get("scaling_factor", 0.18215),
              shift_factor=d.get("shift_factor"),
              use_quant_conv=d.get("use_quant_conv", True),
              use_post_quant_conv=d.get("use_post_quant_conv", True),
              mid_block_add_attention=d.get("mid_block_add_attention", True))
    try:
      return cls(**kw, dtype=str(dtype))
    except ValueError as e:
      raise ValueError(f"vae config: {e}") from e


FLUX1_AE = AutoencoderConfig()


# ----------------------------------------------------------------------------
# Modules (NHWC).


def _dt(cfg: AutoencoderConfig):
  return jnp.dtype(cfg.dtype)


def _precision(dtype):
  # float32 means float32: TPUs would otherwise multiply in bfloat16 passes.
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class GroupNorm(nn.Module):
  """Group norm over (H, W, C/G) in float32, optionally followed by SiLU."""

  groups: int
  dtype: Any = jnp.float32
  silu: bool = False

  @nn.compact
  def __call__(self, x):
    b, c = x.shape[0], x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.dtype)
    g = x.astype(jnp.float32).reshape(b, -1, self.groups, c // self.groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + _EPS)).reshape(x.shape)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    if self.silu:
      y = nn.silu(y)
    return y.astype(self.dtype)


def _conv(features: int, kernel: int, name: str, dtype, stride: int = 1, padding=None):
  pad = padding if padding is not None else ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                 dtype=dtype, param_dtype=dtype, precision=_precision(dtype), name=name)


class ResnetBlock(nn.Module):
  cfg: AutoencoderConfig
  features: int

  @nn.compact
  def __call__(self, x):
    dt, g = _dt(self.cfg), self.cfg.norm_num_groups
    h = GroupNorm(g, dt, silu=True, name="norm1")(x)
    h = _conv(self.features, 3, "conv1", dt)(h)
    h = GroupNorm(g, dt, silu=True, name="norm2")(h)
    h = _conv(self.features, 3, "conv2", dt)(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, "conv_shortcut", dt)(x)
    return x + h


def _attend(q, k, v):
  """Single-head softmax(q k^T / sqrt(C)) v over [B, N, C]; logits and softmax
  in float32, the queries taken `_ATTN_QUERY_CHUNK` rows at a time so the
  logits never exceed [B, chunk, N]."""
  scale = q.shape[-1] ** -0.5

  def rows(qc):
    s = jnp.einsum("bqc,bkc->bqk", qc, k, preferred_element_type=jnp.float32,
                   precision=_precision(q.dtype)) * scale
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bqk,bkc->bqc", p, v, precision=_precision(q.dtype))

  b, n, c = q.shape
  if n <= _ATTN_QUERY_CHUNK:
    return rows(q)
  chunks = -(-n // _ATTN_QUERY_CHUNK)
  qp = jnp.pad(q, ((0, 0), (0, chunks * _ATTN_QUERY_CHUNK - n), (0, 0)))
  qp = qp.reshape(b, chunks, _ATTN_QUERY_CHUNK, c).transpose(1, 0, 2, 3)
  out = jax.lax.map(rows, qp)                       # [chunks, B, chunk, C]
  return out.transpose(1, 0, 2, 3).reshape(b, chunks * _ATTN_QUERY_CHUNK, c)[:, :n]


class Attention(nn.Module):
  cfg: AutoencoderConfig

  @nn.compact
  def __call__(self, x):
    dt = _dt(self.cfg)
    b, hh, ww, c = x.shape
    h = GroupNorm(self.cfg.norm_num_groups, dt, name="group_norm")(x).reshape(b, hh * ww, c)
    dense = lambda name: nn.Dense(c, dtype=dt, param_dtype=dt, precision=_precision(dt),
                                  name=name)
    o = _attend(dense("to_q")(h), dense("to_k")(h), dense("to_v")(h))
    return x + dense("to_out")(o).reshape(b, hh, ww, c)


class MidBlock(nn.Module):
  cfg: AutoencoderConfig

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(self.cfg, c, name="resnets_0")(x)
    if self.cfg.mid_block_add_attention:
      x = Attention(self.cfg, name="attention")(x)
    return ResnetBlock(self.cfg, c, name="resnets_1")(x)


class DownBlock(nn.Module):
  cfg: AutoencoderConfig
  features: int
  downsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.cfg.layers_per_block):
      x = ResnetBlock(self.cfg, self.features, name=f"resnets_{j}")(x)
    if self.downsample:   # pad bottom / right by one, then a valid stride-2 conv
      x = _conv(self.features, 3, "downsample", _dt(self.cfg), stride=2,
                padding=((0, 1), (0, 1)))(x)
    return x


class UpBlock(nn.Module):
  cfg: AutoencoderConfig
  features: int
  upsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.cfg.layers_per_block + 1):
      x = ResnetBlock(self.cfg, self.features, name=f"resnets_{j}")(x)
    if self.upsample:     # nearest x2, then a 3x3 conv
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = _conv(self.features, 3, "upsample", _dt(self.cfg))(x)
    return x


class Encoder(nn.Module):
  cfg: AutoencoderConfig

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, _dt(self.cfg)
    boc = cfg.block_out_channels
    x = _conv(boc[0], 3, "conv_in", dt)(x)
    for i, ch in enumerate(boc):
      x = DownBlock(cfg, ch, i < len(boc) - 1, name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg, name="mid_block")(x)
    x = GroupNorm(cfg.norm_num_groups, dt, silu=True, name="conv_norm_out")(x)
    return _conv(2 * cfg.latent_channels, 3, "conv_out", dt)(x)


class Decoder(nn.Module):
  cfg: AutoencoderConfig

  @nn.compact
  def __call__(self, z):
    cfg, dt = self.cfg, _dt(self.cfg)
    rev = cfg.block_out_channels[::-1]
    x = _conv(rev[0], 3, "conv_in", dt)(z)
    x = MidBlock(cfg, name="mid_block")(x)
    for i, ch in enumerate(rev):
      x = UpBlock(cfg, ch, i < len(rev) - 1, name=f"up_blocks_{i}")(x)
    x = GroupNorm(cfg.norm_num_groups, dt, silu=True, name="conv_norm_out")(x)
    return _conv(cfg.out_channels, 3, "conv_out", dt)(x)


class AutoencoderKL(nn.Module):
  cfg: AutoencoderConfig

  def setup(self):
    cfg, dt = self.cfg, _dt(self.cfg)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, None, dt)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, None, dt)

  def encode(self, x):
    h = self.encoder(x)
    if self.cfg.use_quant_conv:
      h = self.quant_conv(h)
    return h[..., :self.cfg.latent_channels]       # the mean; logvar is the rest

  def decode(self, z):
    if self.cfg.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    return self.decode(self.encode(x))


# ----------------------------------------------------------------------------
# Functional API.


def _check_input(shape, channels: int, multiple: int, what: str, layout: str) -> None:
  """Raises ValueError unless `shape` is a non-empty rank-4 `layout` batch with
  `channels` channels and spatial sizes that are multiples of `multiple`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 4:
    raise ValueError(f"{what} must be rank 4 [{', '.join(layout)}], got shape {shape}")
  dims = dict(zip(layout, shape))
  if min(shape) == 0:
    raise ValueError(f"{what} of shape {shape} [{', '.join(layout)}] is empty")
  if dims["C"] != channels:
    raise ValueError(f"{what} of shape {shape} [{', '.join(layout)}] has {dims['C']} channels; "
                     f"the autoencoder expects {channels}")
  for axis, name in (("H", "height"), ("W", "width")):
    if dims[axis] % multiple:
      raise ValueError(f"{what} {name} {dims[axis]} (shape {shape}) is not a multiple of the "
                       f"autoencoder's scale factor {multiple}")


def param_shapes(cfg: AutoencoderConfig) -> dict:
  """The params tree as jax.ShapeDtypeStructs (nothing computed)."""
  x = jax.ShapeDtypeStruct((1, cfg.scale_factor, cfg.scale_factor, cfg.in_channels), _dt(cfg))
  return jax.eval_shape(lambda r, x: AutoencoderKL(cfg).init(r, x)["params"],
                        jax.random.PRNGKey(0), x)


def init_params(cfg: AutoencoderConfig, rng) -> dict:
  """Random parameters in `cfg.dtype`: conv / dense kernels LeCun-normal
  (N(0, 1 / fan_in)), biases 0, norm scales 1. The shapes come from the
  module (`jax.eval_shape`, nothing computed); the numbers are drawn on the
  host from a generator seeded by `rng` (a jax PRNG key), which is much
  faster than compiling a threefry draw per parameter shape."""
  shapes = param_shapes(cfg)
  if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  gen = np.random.default_rng(np.asarray(rng, np.uint32).ravel().tolist())
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for path, leaf in leaves:
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      v = gen.standard_normal(leaf.shape, np.float32) * np.float32(fan_in ** -0.5)
    elif name == "scale":
      v = np.ones(leaf.shape, np.float32)
    else:
      v = np.zeros(leaf.shape, np.float32)
    out.append(jnp.asarray(v, leaf.dtype))
  return jax.tree_util.tree_unflatten(tree, out)


def encode(params, cfg: AutoencoderConfig, images_nhwc) -> jax.Array:
  """Images [B, H, W, in_channels] in [-1, 1] -> the latent distribution's mean
  [B, H/f, W/f, latent_channels] in float32 (unscaled). Jittable (cfg static)."""
  _check_input(jnp.shape(images_nhwc), cfg.in_channels, cfg.scale_factor, "images", "BHWC")
  x = jnp.asarray(images_nhwc).astype(_dt(cfg))
  out = AutoencoderKL(cfg).apply({"params": params}, x, method=AutoencoderKL.encode)
  return out.astype(jnp.float32)


def decode(params, cfg: AutoencoderConfig, latents_nhwc) -> jax.Array:
  """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f,
  out_channels] in float32 (nominally [-1, 1], not clipped). Jittable."""
  _check_input(jnp.shape(latents_nhwc), cfg.latent_channels, 1, "latents", "BHWC")
  z = jnp.asarray(latents_nhwc).astype(_dt(cfg))
  out = AutoencoderKL(cfg).apply({"params": params}, z, method=AutoencoderKL.decode)
  return out.astype(jnp.float32)


# ----------------------------------------------------------------------------
# The numpy face.


class Autoencoder:
  """diffusers AutoencoderKL semantics on numpy NCHW arrays: `encode` gives
  `vae.encode(x).latent_dist.mean`, `decode` gives `vae.decode(z).sample`,
  `to_latents` / `from_latents` add the FLUX pipelines' shift and scaling.
  The jitted callables live on the instance (one compile per input size);
  `traces` counts the compiles."""

  def __init__(self, cfg: AutoencoderConfig, params):
    self.cfg = cfg
    self.params = jax.device_put(params)
    self.traces = {"encode": 0, "decode": 0}

    def enc(p, x):
      self.traces["encode"] += 1
      return encode(p, cfg, x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    def dec(p, z):
      self.traces["decode"] += 1
      return decode(p, cfg, z.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    self._encode = jax.jit(enc)
    self._decode = jax.jit(dec)

  @staticmethod
  def _array(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == as_dtype("bfloat16")):
      raise ValueError(f"{what} must be floating point (images in [-1, 1]), got dtype {x.dtype}")
    return x.astype(np.float32)

  def encode(self, images) -> np.ndarray:
    """[B, in_channels, H, W] in [-1, 1] -> latent mean [B, C, H/f, W/f]
    (unscaled); H and W must be multiples of cfg.scale_factor."""
    x = self._array(images, "images")
    _check_input(x.shape, self.cfg.in_channels, self.cfg.scale_factor, "images", "BCHW")
    return np.asarray(self._encode(self.params, x))

  def decode(self, latents) -> np.ndarray:
    """Unscaled latents [B, C, h, w] -> images [B, out_channels, h*f, w*f]."""
    z = self._array(latents, "latents")
    _check_input(z.shape, self.cfg.latent_channels, 1, "latents", "BCHW")
    return np.asarray(self._decode(self.params, z))

  @property
  def _shift(self) -> float:
    return 0.0 if self.cfg.shift_factor is None else float(self.cfg.shift_factor)

  def to_latents(self, images) -> np.ndarray:
    """(mean - shift_factor) * scaling_factor: what the FLUX pipelines feed
    the transformer."""
    return ((self.encode(images) - self._shift) * self.cfg.scaling_factor).astype(np.float32)

  def from_latents(self, latents) -> np.ndarray:
    """decode(latents / scaling_factor + shift_factor)."""
    z = self._array(latents, "latents")
    return self.decode(z / self.cfg.scaling_factor + self._shift)
