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
