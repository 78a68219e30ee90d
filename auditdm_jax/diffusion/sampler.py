"""The flow-matching Euler sampler of FLUX.1 dev and Kontext, as one jitted loop.

Facts (from the FLUX release and diffusers' FlowMatchEulerDiscreteScheduler
with FLUX's scheduler_config.json):
  sigmas     linspace(1, 1/steps, steps), then shifted by the image's token
             count: mu = base_shift + (max_shift - base_shift) *
             (n - base_seq) / (max_seq - base_seq) and
             sigma' = e^mu / (e^mu + (1/sigma - 1))   ("exponential"; "linear":
             mu / (mu + (1/sigma - 1))); without dynamic shifting a fixed
             shift s: s*sigma / (1 + (s-1)*sigma). A terminal 0 is appended.
  step       x <- x + (sigma_{i+1} - sigma_i) * v(x, sigma_i), in float32;
             the transformer sees timestep sigma_i (it multiplies by 1000).
  guidance   FLUX dev is guidance-distilled: the scale is an input of the
             transformer (its guidance embedding), one forward per step.
  packing    latents [B, C, h, w] -> tokens [B, (h/2)(w/2), 4C], feature
             order (c, dy, dx); position ids (0, row, col) on the 2x2 grid.
  Kontext    the reference image's packed latents are appended after the
             noisy tokens with ids (1, row, col); only the first N outputs
             (the noisy tokens') are kept.
Our latents are NHWC inside; `pack` / `unpack` take NHWC.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax.diffusion import flux


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """The parts of diffusers' scheduler_config.json FLUX uses."""

  num_train_timesteps: int = 1000
  shift: float = 3.0
  use_dynamic_shifting: bool = True
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096
  base_shift: float = 0.5
  max_shift: float = 1.15
  time_shift_type: str = "exponential"

  @classmethod
  def from_diffusers(cls, d: dict) -> "SchedulerConfig":
    name = d.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
      raise ValueError(f"scheduler {name!r} is not supported (FLUX uses "
                       f"FlowMatchEulerDiscreteScheduler)")
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                 "invert_sigmas", "stochastic_sampling"):
      if d.get(flag):
        raise ValueError(f"scheduler option {flag}=True is not supported")
    if d.get("shift_terminal"):
      raise ValueError("scheduler option shift_terminal is not supported")
    kw = {f.name: type(f.default)(d[f.name]) for f in dataclasses.fields(cls)
          if d.get(f.name) is not None}
    out = cls(**kw)
    if out.time_shift_type not in ("exponential", "linear"):
      raise ValueError(f"scheduler time_shift_type {out.time_shift_type!r} is not "
                       f"'exponential' or 'linear'")
    return out


FLUX1_SCHEDULER = SchedulerConfig()


def shift_mu(image_seq_len: int, sched: SchedulerConfig) -> float:
  m = (sched.max_shift - sched.base_shift) / (sched.max_image_seq_len - sched.base_image_seq_len)
  return image_seq_len * m + (sched.base_shift - m * sched.base_image_seq_len)


def sigmas(steps: int, image_seq_len: int, sched: SchedulerConfig = FLUX1_SCHEDULER
           ) -> np.ndarray:
  """float32 [steps + 1]: the noise levels of each step and the terminal 0."""
  if int(steps) < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  s = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32).astype(np.float64)
  if sched.use_dynamic_shifting:
    mu = shift_mu(image_seq_len, sched)
    if sched.time_shift_type == "exponential":
      s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    else:
      s = mu / (mu + (1.0 / s - 1.0))
  else:
    s = sched.shift * s / (1.0 + (sched.shift - 1.0) * s)
  return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])


def pack(latents):
  """[B, h, w, C] -> [B, (h/2)(w/2), 4C], features ordered (c, dy, dx)."""
  b, h, w, c = latents.shape
  if h % 2 or w % 2:
    raise ValueError(f"latent grid {h}x{w} is not even (packing takes 2x2 cells)")
  x = latents.reshape(b, h // 2, 2, w // 2, 2, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, h: int, w: int):
  """[B, (h/2)(w/2), 4C] -> [B, h, w, C] (the inverse of `pack`)."""
  b, n, f = tokens.shape
  if n != (h // 2) * (w // 2) or f % 4:
    raise ValueError(f"{n} tokens of {f} features do not unpack to a {h}x{w} grid")
  x = tokens.reshape(b, h // 2, w // 2, f // 4, 2, 2)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h, w, f // 4)


def image_ids(h: int, w: int, frame: int = 0) -> np.ndarray:
  """float32 [(h/2)(w/2), 3]: (frame, row, col) of each packed token of an
  h x w latent grid."""
  ids = np.zeros((h // 2, w // 2, 3), np.float32)
  ids[..., 0] = frame
  ids[..., 1] = np.arange(h // 2)[:, None]
  ids[..., 2] = np.arange(w // 2)[None, :]
  return ids.reshape(-1, 3)


@functools.partial(jax.jit, static_argnames=("cfg",))
def denoise(params, cfg: flux.FluxConfig, latents, reference, prompt_embeds, pooled,
            img_ids, txt_ids, sigma, guidance):
  """Runs every Euler step in one `lax.fori_loop`.

  latents [B, N, F] (the packed initial noise), reference [B, M, F] or None
  (Kontext: the reference image's packed latents; img_ids then has N + M
  rows), sigma float32 [steps + 1], guidance [B] or None. Returns the packed
  clean latents [B, N, F] in the latents' dtype.
  """
  n = latents.shape[1]
  steps = sigma.shape[0] - 1
  batch = latents.shape[0]

  def body(i, x):
    s = sigma[i]
    inputs = x if reference is None else jnp.concatenate([x, reference.astype(x.dtype)], axis=1)
    t = jnp.full((batch,), (s * 1000.0) / 1000.0, x.dtype)
    v = flux.apply(params, cfg, inputs, prompt_embeds, pooled, t, img_ids, txt_ids, guidance)
    v = v[:, :n]
    out = x.astype(jnp.float32) + (sigma[i + 1] - s) * v.astype(jnp.float32)
    return out.astype(x.dtype)

  return jax.lax.fori_loop(0, steps, body, latents)
