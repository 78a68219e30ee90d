"""FLUX.1 dev and FLUX.1 Kontext dev in JAX: the image routes of the audit.

The public face (numpy in, numpy out):
  flux_transformer(path)  -> flux.Transformer; `__call__(hidden_states,
      encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
      guidance=None)` with the arguments and semantics of diffusers'
      FluxTransformer2DModel.forward (returns the sample)
  autoencoder(path)       -> autoencoder.Autoencoder; `encode(images)` (the
      latent distribution's mean) and `decode(latents)`, as AutoencoderKL
  load(path)              -> pipeline.Pipeline; `edit(images, instructions,
      rng)` (Kontext) and `generate(prompts, rng, height, width)` (dev)

Modules: flux.py (the transformer), vae.py (the 16-channel autoencoder),
text.py (T5 v1.1 and CLIP-L text encoders), tokenizers.py, sampler.py (the
flow-matching Euler loop, packing, position ids), pipeline.py (loading a
diffusers pipeline directory or Black Forest Labs single files, the two
routes), common.py (safetensors reading, dtype names), ckpt/ (each
component's checkpoint names and loader: flux.py, vae.py, text.py).
"""

from __future__ import annotations

from auditdm_jax.diffusion.flux_pipeline import Pipeline, load


def flux_transformer(path: str, dtype: str = "bfloat16"):
  """The FLUX transformer of a diffusers `transformer/` directory or a Black
  Forest Labs single file (flux1-dev / flux1-kontext-dev .safetensors)."""
  from auditdm_jax.diffusion.ckpt import flux  # pylint: disable=import-outside-toplevel
  return flux.load_transformer(str(path), dtype)


def autoencoder(path: str, dtype: str = "bfloat16"):
  """The FLUX autoencoder of a diffusers `vae/` directory or `ae.safetensors`."""
  from auditdm_jax.diffusion.ckpt import vae as ae  # pylint: disable=import-outside-toplevel
  return ae.load_autoencoder(str(path), dtype)


__all__ = ["Pipeline", "autoencoder", "flux_transformer", "load"]
