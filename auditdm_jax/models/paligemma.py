"""PaliGemma 2: SigLIP image tokens as the prefix of a Gemma 2 prefix-LM.

Parameters: {"img": SigLIP (with head into the LLM width), "llm": Gemma}, the
big_vision layout, so a big_vision `.npz` maps onto it key for key.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.gemma import Gemma, GemmaOutput, make_attn_mask
from auditdm_jax.models.siglip import SigLIP


def prefix_inputs(num_image_tokens: int, input_mask, mask_ar):
  """Extends text input_mask/mask_ar [B, T] by the image prefix.

  Returns (attn_mask [B, n+T, n+T], positions [B, n+T], prefix_pairs
  [B, n+T, n+T]): image tokens are always valid and belong to the
  bidirectional prefix (mask_ar = 0); prefix_pairs marks query/key pairs that
  both lie in that prefix, which sliding-window layers leave unrestricted.
  """
  b = input_mask.shape[0]
  full_mask = jnp.concatenate(
      [jnp.ones((b, num_image_tokens), jnp.bool_), input_mask.astype(jnp.bool_)], 1)
  full_ar = jnp.concatenate(
      [jnp.zeros((b, num_image_tokens), jnp.int32), mask_ar.astype(jnp.int32)], 1)
  positions = jnp.cumsum(full_mask.astype(jnp.int32), axis=-1) - 1
  in_prefix = jnp.cumsum(full_ar, axis=-1) == 0
  prefix_pairs = in_prefix[:, :, None] & in_prefix[:, None, :]
  return make_attn_mask(full_mask, full_ar), positions, prefix_pairs


class PaliGemma(nn.Module):
  cfg: VLMConfig

  def setup(self):
    self.img = SigLIP(self.cfg.vision)
    self.llm = Gemma(self.cfg.text)

  def embed_image(self, images):
    """uint8 [B, H, W, 3] -> [B, num_patches, D] (no sqrt(D) scaling)."""
    return self.img(images)

  def embed_text(self, tokens):
    return self.llm.embed_tokens(tokens)

  def __call__(self, images, tokens, input_mask, mask_ar, return_hidden=False,
               return_kv=False) -> GemmaOutput:
    """The LLM's `GemmaOutput` over [image tokens, text tokens]: logits float32
    [B, n_img + T, V], hidden [B, n_img + T, D], kv.

    tokens, input_mask, mask_ar: [B, T]. mask_ar is 0 over the prompt (the
    bidirectional prefix) and 1 over the answer (causal). return_hidden skips
    the vocabulary projection (logits None: a caller that projects only some
    positions); return_kv fills kv = (k, v), each [L, B, n_img + T, K, H], to
    seed a KV cache. The output is typed whatever the flags (as gemma's
    `Output`), so a caller reads `.logits` / `.hidden` / `.kv` by name and
    never unpacks a flag-dependent tuple; the flags only choose what is
    computed.
    """
    img = self.embed_image(images)
    txt = self.embed_text(tokens)
    x = jnp.concatenate([img.astype(txt.dtype), txt], axis=1)
    attn_mask, positions, prefix_pairs = prefix_inputs(img.shape[1], input_mask, mask_ar)
    return self.llm(x, positions, attn_mask, window_exempt=prefix_pairs,
                    return_hidden=return_hidden, return_kv=return_kv)
