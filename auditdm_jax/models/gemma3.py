"""Gemma 3 VLM: SigLIP at 896px, 4x4 average pool to 256 soft tokens, RMSNorm +
projection into a Gemma 3 decoder, image blocks interleaved with the text.

Parameters: {"img": SigLIP (no head), "llm": Gemma} where the Gemma embedder
also holds `mm_soft_embedding_norm` and `mm_input_projection`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.gemma import Gemma, GemmaOutput
from auditdm_jax.models.siglip import SigLIP


def expand_image_tokens(prompt: Sequence[int], cfg: VLMConfig) -> list[int]:
  """Expands the one `boi_id` of a prompt into the full image block.

  [.. boi ..] -> [.. wrap boi img*n eoi wrap ..] (wrap = image_wrap_id, if set).
  Raises ValueError unless the prompt holds exactly one boi and no raw image
  placeholder or eoi tokens.
  """
  prompt = [int(t) for t in prompt]
  n_boi = prompt.count(cfg.boi_id)
  if n_boi != 1:
    raise ValueError(f"a Gemma 3 prompt must hold exactly one <start_of_image> "
                     f"token (id {cfg.boi_id}) where the image goes; found {n_boi}")
  if cfg.image_token_id in prompt or cfg.eoi_id in prompt:
    raise ValueError("a Gemma 3 prompt must not contain image placeholder "
                     f"({cfg.image_token_id}) or <end_of_image> ({cfg.eoi_id}) "
                     "tokens: the model inserts them")
  i = prompt.index(cfg.boi_id)
  wrap = [] if cfg.image_wrap_id is None else [cfg.image_wrap_id]
  block = wrap + [cfg.boi_id] + [cfg.image_token_id] * cfg.mm_tokens_per_image
  block += [cfg.eoi_id] + wrap
  return prompt[:i] + block + prompt[i + 1:]


def interleaved_mask(is_image, input_mask):
  """Causal mask [B, T, T] plus bidirectional attention inside image blocks.

  Consecutive image-placeholder tokens form one block; blocks are numbered so
  that two different images never see each other's future tokens.
  """
  is_image = is_image.astype(jnp.bool_)
  valid = input_mask.astype(jnp.bool_)
  t = is_image.shape[1]
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))[None]
  prev = jnp.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
  block_id = jnp.cumsum(is_image & ~prev, axis=1)
  same_block = (is_image[:, :, None] & is_image[:, None, :]
                & (block_id[:, :, None] == block_id[:, None, :]))
  return (causal | same_block) & valid[:, None, :] & valid[:, :, None]


class Gemma3VLM(nn.Module):
  cfg: VLMConfig

  def setup(self):
    self.img = SigLIP(self.cfg.vision)
    self.llm = Gemma(self.cfg.text)

  def embed_image(self, images):
    """uint8 [B, H, W, 3] -> soft tokens [B, mm_tokens_per_image, D]."""
    cfg = self.cfg
    feats = self.img(images)
    b, _, d = feats.shape
    g = cfg.vision.grid
    side = int(round(np.sqrt(cfg.mm_tokens_per_image)))
    k = g // side
    pooled = feats.reshape(b, side, k, side, k, d).mean(axis=(2, 4))
    return self.llm.embed_vision(pooled.reshape(b, side * side, d))

  def __call__(self, images, tokens, input_mask, return_hidden=False,
               return_kv=False) -> GemmaOutput:
    """The LLM's `GemmaOutput` (logits float32 [B, T, V], hidden [B, T, D], kv)
    for expanded tokens [B, T] (see `expand_image_tokens`); row b's image
    fills its placeholder positions. Typed whatever the flags;
    return_hidden / return_kv choose what is computed, as for PaliGemma."""
    cfg = self.cfg
    is_image = tokens == cfg.image_token_id
    # The placeholder id may lie outside the embedding table: look up 0.
    x = self.llm.embed_tokens(jnp.where(is_image, 0, tokens))
    if images is not None:
      img = self.embed_image(images).astype(x.dtype)
      slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, img.shape[1] - 1)
      x = jnp.where(is_image[..., None],
                    jnp.take_along_axis(img, slot[..., None], axis=1), x)
    positions = jnp.cumsum(input_mask.astype(jnp.int32), axis=-1) - 1
    mask = interleaved_mask(is_image, input_mask)
    return self.llm(x, positions, mask, return_hidden=return_hidden, return_kv=return_kv)
