"""FLUX.1 dev (text -> image) and FLUX.1 Kontext dev (image + instruction ->
image) as one object: `load(path)` -> `Pipeline` with `generate` and `edit`.

What a call does (the order and formulas of the FLUX pipelines):
  1. prompts -> CLIP-L pooled embedding (77 tokens) and T5 v1.1 hidden states
     (`max_sequence_length` tokens, 512 for dev); text ids are zeros;
  2. noise [B, C, h, w] (h = 2 * (H // (2f)), f the autoencoder's scale) is
     packed into 2x2 tokens; Kontext also encodes the reference image (the
     latent mean, shifted and scaled) and appends its tokens with frame id 1;
  3. the Euler loop (`sampler.denoise`, one jitted `fori_loop`) with the
     resolution-dependent shift; guidance is the transformer's input;
  4. unpack, unscale, decode, map [-1, 1] -> [0, 1].
Each jitted piece compiles once per shape: `generate` per (batch, height,
width), `edit` per (batch, resolution bucket). With a mesh, every parameter
is placed by the partition rules (automatic FSDP over `fsdp`, see
`auditdm_jax.sharding`) and batches are split over data x fsdp.

Checkpoints: a diffusers pipeline directory (model_index.json, scheduler/,
transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/),
local or gs://; a Black Forest Labs single file may replace the transformer
(`flux1-dev.safetensors`, `flux1-kontext-dev.safetensors`) or the autoencoder
(`ae.safetensors`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax import sharding as sharding_lib
from auditdm_jax.diffusion import vae as ae_lib
from auditdm_jax.diffusion import flux, sampler, text, tokenizers
from auditdm_jax.diffusion.ckpt import flux as flux_ckpt
from auditdm_jax.diffusion.ckpt import text as text_ckpt
from auditdm_jax.diffusion.ckpt import vae as ae_ckpt
from auditdm_jax.diffusion.common import CheckpointError, read_json
from auditdm_jax.utils import fileio

# Kontext's training resolutions (width, height); an edit's reference image is
# resized to the one closest in aspect ratio (FLUX.1 Kontext release).
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248),
    (880, 1184), (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832),
    (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)
PIPELINE_CLASSES = {"FluxPipeline": "generate", "FluxKontextPipeline": "edit"}
DEFAULTS = {"generate": dict(steps=28, guidance=3.5), "edit": dict(steps=28, guidance=2.5)}
REPLICATE_RULES = ((r".*", ()),)   # automatic FSDP only (sharding.spec_for_param)


@dataclasses.dataclass
class Components:
  transformer: flux.Transformer
  autoencoder: ae_lib.Autoencoder
  clip: text.ClipText
  clip_tokenizer: tokenizers.ClipTokenizer
  t5: text.T5Encoder
  t5_tokenizer: tokenizers.T5Tokenizer
  scheduler: sampler.SchedulerConfig


def _to_float_images(images, name: str = "images") -> np.ndarray:
  """uint8 [B, H, W, 3] or float [B, H, W, 3] in [0, 1] -> float32 [0, 1]."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"{name} must be [B, H, W, 3] (RGB), got shape {x.shape}")
  if x.shape[0] == 0:
    raise ValueError(f"{name} is an empty batch")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
    raise ValueError(f"float {name} must be finite and in [0, 1] (or pass uint8)")
  return x


def _check_texts(texts, name: str) -> list[str]:
  if isinstance(texts, str):
    raise ValueError(f"{name} must be a sequence of strings, not one string")
  out = list(texts)
  if not out:
    raise ValueError(f"{name} is empty")
  for i, t in enumerate(out):
    if not isinstance(t, str) or not t.strip():
      raise ValueError(f"{name}[{i}] is empty or not a string: {t!r}")
  return out


def _resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
  """float [B, H, W, 3] in [0, 1] resized with Lanczos (as diffusers resizes
  PIL inputs); unchanged when the size already matches."""
  if images.shape[1:3] == (height, width):
    return images
  from PIL import Image  # pylint: disable=import-outside-toplevel
  out = []
  for im in images:
    pil = Image.fromarray(np.round(im * 255.0).astype(np.uint8))
    out.append(np.asarray(pil.resize((width, height), Image.LANCZOS), np.float32) / 255.0)
  return np.stack(out)


def _rng(rng) -> jax.Array:
  if isinstance(rng, (int, np.integer)):
    return jax.random.key(int(rng))
  return rng


class Pipeline:
  """A FLUX pipeline; `mode` is "generate" (FLUX.1 dev) or "edit" (Kontext)."""

  def __init__(self, parts: Components, mode: str, *, max_sequence_length: int = 512,
               mesh: jax.sharding.Mesh | None = None, source: str = "",
               fsdp_min_size: int = sharding_lib.FSDP_MIN_SIZE):
    if mode not in DEFAULTS:
      raise ValueError(f"mode {mode!r} is not one of {sorted(DEFAULTS)}")
    self.parts, self.mode, self.source = parts, mode, source
    self.max_sequence_length = int(max_sequence_length)
    self.mesh = mesh
    self.scale = int(parts.autoencoder.cfg.scale_factor)
    self.latent_channels = int(parts.autoencoder.cfg.latent_channels)
    tcfg = parts.transformer.cfg
    if tcfg.in_channels != 4 * self.latent_channels:
      raise CheckpointError(f"pipeline {source}: the transformer takes {tcfg.in_channels} "
                            f"features per token but the autoencoder's "
                            f"{self.latent_channels} latent channels pack to "
                            f"{4 * self.latent_channels}")
    self.params = {"transformer": parts.transformer.params,
                   "autoencoder": parts.autoencoder.params,
                   "clip": parts.clip.params, "t5": parts.t5.params}
    if mesh is not None:
      shapes = jax.eval_shape(lambda p: p, self.params)
      self.params = jax.device_put(
          self.params, sharding_lib.param_shardings(shapes, mesh, REPLICATE_RULES,
                                                    fsdp_min_size))
    self._jits: dict[str, Any] = {}

  # -- pieces -------------------------------------------------------------------

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    spec = sharding_lib.batch_spec(x.shape[0], self.mesh, x.ndim)
    s = jax.sharding.NamedSharding(self.mesh, spec)
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  def _jit(self, name: str, fn):
    if name not in self._jits:
      self._jits[name] = jax.jit(fn)
    return self._jits[name]

  def encode_prompts(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """(T5 hidden states [B, S, D], CLIP pooled [B, Dp])."""
    prompts = _check_texts(prompts, "prompts")
    clip_ids = self.parts.clip_tokenizer(prompts)
    t5_ids = self.parts.t5_tokenizer(prompts, self.max_sequence_length)
    ccfg, tcfg = self.parts.clip.cfg, self.parts.t5.cfg
    clip_fn = self._jit("clip", lambda p, ids: text.clip_encode(p, ccfg, ids)[1])
    t5_fn = self._jit("t5", lambda p, ids: text.t5_encode(p, tcfg, ids))
    pooled = clip_fn(self.params["clip"], self._put(clip_ids))
    embeds = t5_fn(self.params["t5"], self._put(t5_ids))
    return embeds, pooled

  def latent_grid(self, height: int, width: int) -> tuple[int, int]:
    f = self.scale
    h, w = 2 * (int(height) // (2 * f)), 2 * (int(width) // (2 * f))
    if h < 2 or w < 2:
      raise ValueError(f"{height}x{width} is too small for the autoencoder's "
                       f"{f}x compression and 2x2 packing (at least {2 * f} pixels a side)")
    return h, w

  def _noise(self, rng, noise, batch: int, h: int, w: int) -> np.ndarray:
    shape = (batch, self.latent_channels, h, w)
    if noise is None:
      noise = np.asarray(jax.random.normal(_rng(rng), shape, jnp.float32))
    noise = np.asarray(noise, np.float32)
    if noise.shape != shape:
      raise ValueError(f"noise must have shape {shape} [B, C, h, w], got {noise.shape}")
    return noise.transpose(0, 2, 3, 1)   # NHWC

  def _run(self, embeds, pooled, noise_nhwc, reference, ids, steps: int, guidance: float,
           output: str) -> np.ndarray:
    tcfg = self.parts.transformer.cfg
    dtype = jnp.dtype(_dtype_name(tcfg.dtype))
    b, h, w, _ = noise_nhwc.shape
    latents = sampler.pack(noise_nhwc).astype(np.float32)
    sig = sampler.sigmas(int(steps), latents.shape[1], self.parts.scheduler)
    g = np.full((b,), float(guidance), np.float32) if tcfg.guidance_embeds else None
    txt_ids = jnp.zeros((embeds.shape[1], 3), jnp.float32)
    out = sampler.denoise(self.params["transformer"], tcfg,
                          self._put(latents).astype(dtype), reference,
                          embeds.astype(dtype), pooled.astype(dtype), jnp.asarray(ids), txt_ids,
                          jnp.asarray(sig), None if g is None else self._put(g).astype(dtype))
    acfg = self.parts.autoencoder.cfg
    shift = acfg.shift_factor or 0.0
    decode = self._jit("decode", lambda p, z: ae_lib.decode(
        p, acfg, sampler.unpack(z, h, w).astype(jnp.float32) / acfg.scaling_factor + shift))
    # to_host gathers rows split over several processes (a collective)
    images = np.asarray(sharding_lib.to_host(decode(self.params["autoencoder"], out)),
                        np.float32)
    images = np.clip(images / 2.0 + 0.5, 0.0, 1.0)
    if output == "float":
      return images
    if output != "uint8":
      raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    return np.round(images * 255.0).astype(np.uint8)

  # -- the two routes -----------------------------------------------------------

  def generate(self, prompts: Sequence[str], rng, height: int = 1024, width: int = 1024, *,
               steps: int | None = None, guidance: float | None = None, noise=None,
               output: str = "uint8") -> np.ndarray:
    """Images [B, H', W', 3] for `prompts` (H', W' rounded down to the
    packing multiple). `noise`: the initial latent noise [B, C, h, w] (drawn
    from `rng` when None)."""
    d = DEFAULTS["generate"]
    embeds, pooled = self.encode_prompts(prompts)
    h, w = self.latent_grid(height, width)
    noise = self._noise(rng, noise, embeds.shape[0], h, w)
    ids = sampler.image_ids(h, w, 0)
    return self._run(embeds, pooled, noise, None, ids, steps or d["steps"],
                     d["guidance"] if guidance is None else guidance, output)

  def bucket(self, height: int, width: int, auto_resize: bool = True) -> tuple[int, int]:
    """(height, width) an edit of an image of this size runs at: Kontext's
    training resolution closest in aspect ratio (auto_resize), else the size
    itself; rounded down to the packing multiple."""
    m = 2 * self.scale
    if auto_resize:
      ratio = width / height
      _, width, height = min((abs(ratio - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    height, width = height // m * m, width // m * m
    self.latent_grid(height, width)
    return height, width

  def edit(self, images, instructions: Sequence[str], rng, *, steps: int | None = None,
           guidance: float | None = None, noise=None, auto_resize: bool = True,
           output: str = "uint8") -> np.ndarray:
    """Edited images [B, H', W', 3] at the bucket of the inputs' size
    (`bucket`). images: uint8 or float [0, 1] [B, H, W, 3], all one size."""
    if self.mode != "edit":
      raise ValueError(f"pipeline {self.source} is FLUX.1 dev (text to image): "
                       f"edit needs a FLUX.1 Kontext pipeline")
    d = DEFAULTS["edit"]
    x = _to_float_images(images)
    instructions = _check_texts(instructions, "instructions")
    if len(instructions) != x.shape[0]:
      raise ValueError(f"got {x.shape[0]} images but {len(instructions)} instructions")
    height, width = self.bucket(x.shape[1], x.shape[2], auto_resize)
    x = _resize(x, height, width) * 2.0 - 1.0
    embeds, pooled = self.encode_prompts(instructions)
    acfg = self.parts.autoencoder.cfg
    shift = acfg.shift_factor or 0.0
    enc = self._jit("encode", lambda p, im: sampler.pack(
        (ae_lib.encode(p, acfg, im) - shift) * acfg.scaling_factor))
    dtype = jnp.dtype(_dtype_name(self.parts.transformer.cfg.dtype))
    reference = enc(self.params["autoencoder"], self._put(x.astype(np.float32))).astype(dtype)
    h, w = self.latent_grid(height, width)
    noise = self._noise(rng, noise, x.shape[0], h, w)
    rh, rw = h, w   # the reference is encoded at the bucket size too
    ids = np.concatenate([sampler.image_ids(h, w, 0), sampler.image_ids(rh, rw, 1)])
    return self._run(embeds, pooled, noise, reference, ids, steps or d["steps"],
                     d["guidance"] if guidance is None else guidance, output)


def _dtype_name(name: str) -> str:
  return "bfloat16" if str(name) in ("bfloat16", "bf16") else str(name)


# -- loading ------------------------------------------------------------------------


def _component(path: str, sub: str) -> str:
  p = fileio.join(path, sub)
  if not fileio.exists(p):
    raise CheckpointError(f"pipeline {path}: no {sub}/ (a diffusers FLUX pipeline "
                          f"directory has scheduler/, transformer/, vae/, text_encoder/, "
                          f"text_encoder_2/, tokenizer/ and tokenizer_2/)")
  return fileio.stage(p) if fileio.is_remote(p) else p


def read_index(path: str) -> str:
  """The mode ("generate" / "edit") a pipeline directory's model_index.json names."""
  index = read_json(fileio.join(path, "model_index.json"))
  name = index.get("_class_name")
  if name not in PIPELINE_CLASSES:
    raise CheckpointError(f"pipeline {path}: model_index.json names {name!r}, not one of "
                          f"{sorted(PIPELINE_CLASSES)}")
  return PIPELINE_CLASSES[name]


def load(path: str, *, dtype: str = "bfloat16", transformer: str | None = None,
         autoencoder: str | None = None, mesh: jax.sharding.Mesh | None = None,
         max_sequence_length: int = 512, mode: str | None = None,
         fsdp_min_size: int = sharding_lib.FSDP_MIN_SIZE) -> Pipeline:
  """A FLUX pipeline from a diffusers pipeline directory (local or gs://).

  transformer / autoencoder: another checkpoint for that component (a
  Black Forest Labs single file such as flux1-kontext-dev.safetensors /
  ae.safetensors, or a diffusers component directory). mode: "generate" or
  "edit", by default what model_index.json names (FluxPipeline /
  FluxKontextPipeline). fsdp_min_size: arrays smaller than this stay
  replicated on the mesh."""
  path = str(path)
  mode = mode or read_index(path)
  sched = sampler.SchedulerConfig.from_diffusers(
      read_json(fileio.join(path, "scheduler", "scheduler_config.json")))
  parts = Components(
      transformer=flux_ckpt.load_transformer(transformer or _component(path, "transformer"), dtype),
      autoencoder=ae_ckpt.load_autoencoder(autoencoder or _component(path, "vae"), dtype),
      clip=text_ckpt.load_clip(_component(path, "text_encoder"), dtype),
      clip_tokenizer=tokenizers.ClipTokenizer(_component(path, "tokenizer")),
      t5=text_ckpt.load_t5(_component(path, "text_encoder_2"), dtype),
      t5_tokenizer=tokenizers.T5Tokenizer(_component(path, "tokenizer_2")),
      scheduler=sched)
  return Pipeline(parts, mode, max_sequence_length=max_sequence_length, mesh=mesh, source=path,
                  fsdp_min_size=fsdp_min_size)

