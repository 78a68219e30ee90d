"""Denoising steps per second of our FLUX sampler (one jitted fori_loop).

CPU (default): a small FLUX (the published block structure at toy width:
2 double + 4 single blocks, 4 heads x 64, 256 image + 64 text tokens),
random float32 weights; the peer, in the same run, is diffusers'
FluxTransformer2DModel with the same weights driven by its
FlowMatchEulerDiscreteScheduler (the FluxPipeline loop), same inputs, same
step count. Prints steps/s of both and the ratio ours / diffusers, and the
largest difference between the two final latents.

Accelerator (--real): FLUX.1 dev's published shapes (19 double + 38 single
blocks, 24 heads x 128, T5 length 512, 1024 x 1024 -> 4096 image tokens;
--kontext doubles the image tokens as Kontext's reference does) with random
bfloat16 weights. Prints steps/s, the compile time, and MFU against
--peak-tflops (dense bf16 of one chip; default by device kind).

  python bench/flux_denoise.py [--steps 8] [--threads 2]
  python bench/flux_denoise.py --real [--batch 1] [--kontext] [--steps 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v5p": 459.0,
               "TPU v6e": 918.0, "TPU v5 lite": 197.0, "TPU v4": 275.0}


def forward_flops(cfg, tokens: int, txt: int) -> float:
  """Matmul FLOPs of one transformer forward (2 per multiply-add)."""
  d, n = cfg.width, tokens + txt
  mlp = int(cfg.mlp_ratio * d)
  double = 2 * n * d * (3 * d + d + 2 * mlp)    # both streams: qkv, out, MLP
  double += 2 * 2 * n * n * d                    # q k^T and a v
  single = 2 * n * d * (3 * d + mlp) + 2 * n * (d + mlp) * d + 2 * 2 * n * n * d
  return float(cfg.num_layers * double + cfg.num_single_layers * single)


def _time(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def _inputs(cfg, batch, img_tokens, txt, seed=0):
  rng = np.random.default_rng(seed)
  side = int(round(img_tokens ** 0.5))
  from auditdm_jax.diffusion import sampler  # pylint: disable=import-outside-toplevel
  ids = sampler.image_ids(2 * side, 2 * side)
  return (rng.standard_normal((batch, img_tokens, cfg.in_channels)).astype(np.float32),
          rng.standard_normal((batch, txt, cfg.joint_attention_dim)).astype(np.float32),
          rng.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32),
          ids, np.zeros((txt, 3), np.float32))


def cpu(args):
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel  # pylint: disable=import-outside-toplevel
  from auditdm_jax.diffusion import flux, sampler  # pylint: disable=import-outside-toplevel
  from auditdm_jax.diffusion.ckpt import flux as flux_ckpt  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  hf = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                              attention_head_dim=64, num_attention_heads=4,
                              joint_attention_dim=256, pooled_projection_dim=128,
                              guidance_embeds=True, axes_dims_rope=(16, 24, 24)).eval()
  cfg = flux.FluxConfig.from_diffusers(dict(hf.config), dtype="float32")
  params = flux_ckpt.params_from_diffusers({k: v.numpy() for k, v in hf.state_dict().items()},
                                           cfg, "bench")
  img, txt = 256, 64
  x, enc, pooled, img_ids, txt_ids = _inputs(cfg, args.batch, img, txt)
  sig = sampler.sigmas(args.steps, img)
  g = np.full((args.batch,), 3.5, np.float32)

  def ours():
    out = sampler.denoise(params, cfg, jnp.asarray(x), None, jnp.asarray(enc),
                          jnp.asarray(pooled), jnp.asarray(img_ids), jnp.asarray(txt_ids),
                          jnp.asarray(sig), jnp.asarray(g))
    return np.asarray(out)

  t0 = time.perf_counter()
  got = ours()
  compile_s = time.perf_counter() - t0
  sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)

  def peer():
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / args.steps, args.steps),
                        mu=sampler.shift_mu(img, sampler.FLUX1_SCHEDULER))
    sched.set_begin_index(0)
    lat = torch.from_numpy(x)
    with torch.no_grad():
      for t in sched.timesteps:
        v = hf(hidden_states=lat, encoder_hidden_states=torch.from_numpy(enc),
               pooled_projections=torch.from_numpy(pooled),
               timestep=t.expand(args.batch) / 1000, img_ids=torch.from_numpy(img_ids),
               txt_ids=torch.from_numpy(txt_ids), guidance=torch.from_numpy(g),
               return_dict=False)[0]
        lat = sched.step(v, t, lat, return_dict=False)[0]
    return lat.numpy()

  want = peer()
  t_ours, t_peer = _time(ours, args.repeats), _time(peer, args.repeats)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  print(f"small FLUX ({n_params / 1e6:.1f}M params, {img} image + {txt} text tokens, "
        f"batch {args.batch}, {args.steps} steps, float32, {args.threads} threads)")
  print(f"  ours (jax, one fori_loop): {args.steps / t_ours:8.2f} steps/s  "
        f"(compile {compile_s:.1f} s)")
  print(f"  diffusers (torch loop):    {args.steps / t_peer:8.2f} steps/s")
  print(f"  ratio ours / diffusers:    {t_peer / t_ours:8.2f}x")
  print(f"  max |latents ours - diffusers| = {np.abs(got - want).max():.2e}")


def real(args):
  from auditdm_jax.diffusion import flux, sampler  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(flux.FLUX1_DEV, dtype="bfloat16")
  img = (args.resolution // 16) ** 2
  tokens = img * (2 if args.kontext else 1)
  txt = 512
  t0 = time.perf_counter()
  params = flux.init_params(cfg, 0)
  jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  x, enc, pooled, img_ids, txt_ids = _inputs(cfg, args.batch, img, txt)
  ref = None
  if args.kontext:
    ref = jnp.asarray(x, jnp.bfloat16)
    img_ids = np.concatenate([img_ids, np.asarray(img_ids) + np.array([1, 0, 0], np.float32)])
  sig = sampler.sigmas(args.steps, img)
  g = jnp.full((args.batch,), 3.5, jnp.bfloat16)
  args_ = (params, cfg, jnp.asarray(x, jnp.bfloat16), ref, jnp.asarray(enc, jnp.bfloat16),
           jnp.asarray(pooled, jnp.bfloat16), jnp.asarray(img_ids), jnp.asarray(txt_ids),
           jnp.asarray(sig), g)
  t0 = time.perf_counter()
  jax.block_until_ready(sampler.denoise(*args_))
  compile_s = time.perf_counter() - t0
  dt = _time(lambda: jax.block_until_ready(sampler.denoise(*args_)), args.repeats)
  kind = jax.devices()[0].device_kind
  peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), 0.0)
  flops = forward_flops(cfg, tokens, txt) * args.batch * args.steps
  print(f"FLUX.1 dev shapes ({'Kontext, ' if args.kontext else ''}{args.resolution}^2: "
        f"{tokens} image + {txt} text tokens, batch {args.batch}, bf16) on {kind}")
  print(f"  init {init_s:.1f} s, first call (compile + run) {compile_s:.1f} s")
  print(f"  {args.steps / dt:.3f} steps/s ({dt / args.steps * 1000:.0f} ms per step)")
  if peak:
    print(f"  MFU {flops / dt / (peak * 1e12) * 100:.1f}% of {peak:g} TFLOP/s "
          f"({flops / args.steps / 1e12:.1f} TFLOP per step)")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  ap.add_argument("--real", action="store_true")
  ap.add_argument("--kontext", action="store_true")
  ap.add_argument("--resolution", type=int, default=1024)
  ap.add_argument("--peak-tflops", type=float, default=0.0)
  args = ap.parse_args()
  real(args) if args.real else cpu(args)


if __name__ == "__main__":
  main()
