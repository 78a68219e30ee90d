"""Building, initialising and measuring VLMs from a VLMConfig."""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.gemma3 import Gemma3VLM
from auditdm_jax.models.paligemma import PaliGemma


def build(cfg: VLMConfig) -> nn.Module:
  if cfg.family == "paligemma":
    return PaliGemma(cfg)
  if cfg.family == "gemma3":
    return Gemma3VLM(cfg)
  raise ValueError(f"unknown model family {cfg.family!r}")


def _dummy_inputs(cfg: VLMConfig):
  s = cfg.vision.image_size
  images = jnp.zeros((1, s, s, 3), jnp.uint8)
  tokens = jnp.zeros((1, 4), jnp.int32)
  mask = jnp.ones((1, 4), jnp.bool_)
  if cfg.family == "paligemma":
    return images, tokens, mask, jnp.zeros((1, 4), jnp.int32)
  return images, tokens, mask


def init_params(cfg: VLMConfig, rng) -> dict:
  """Random parameters (the `params` collection, without the wrapper dict)."""
  return _jitted_init(cfg)(rng)


@functools.lru_cache(maxsize=16)
def _jitted_init(cfg: VLMConfig):
  module = build(cfg)
  return jax.jit(lambda rng: module.init(rng, *_dummy_inputs(cfg))["params"])


@functools.lru_cache(maxsize=64)
def abstract_params(cfg: VLMConfig) -> dict:
  """ShapeDtypeStructs of the parameters, built without allocating memory."""
  module = build(cfg)
  return jax.eval_shape(
      lambda: module.init(jax.random.key(0), *_dummy_inputs(cfg))["params"])


def count_params(cfg: VLMConfig) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg))))


def flat_shapes(cfg: VLMConfig) -> dict[str, tuple[int, ...]]:
  flat = flax.traverse_util.flatten_dict(abstract_params(cfg), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def scale_post_norms(params: dict, gain: float) -> dict:
  """From-scratch init for the scene models: the LLM's post-attention and
  post-MLP RMSNorms start with gain `gain` (scale = gain - 1, as Gemma norms
  multiply by 1 + scale) instead of 1.

  With gain 1 every residual branch writes unit-RMS output from step 0 (the
  post-norm rescales even an uninformative attention average to full size);
  tiny Gemma-2 stacks trained from scratch then sit for thousands of steps
  on a plateau where attention does not learn to select one token among
  several (measured in docs/scene_world.md). A small gain keeps the early
  branches quiet, as small-init / SkipInit schemes do. Real checkpoints are
  loaded, never initialised, so this touches only models trained from
  scratch (the scene world's).
  """
  if gain == 1.0:
    return params
  layers = params["llm"]["layers"]
  missing = [k for k in ("post_attention_norm", "post_ffw_norm") if k not in layers]
  if missing:
    return params   # a model without post-norms
  out = dict(params)
  out["llm"] = dict(params["llm"])
  out["llm"]["layers"] = dict(layers)
  for k in ("post_attention_norm", "post_ffw_norm"):
    out["llm"]["layers"][k] = {"scale": np.asarray(layers[k]["scale"]) + (gain - 1.0)}
  return out
