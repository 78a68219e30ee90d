"""Tiny random transformers models: the numerical reference for our layers.

Test-only: auditdm_jax itself never imports torch or transformers.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, PaliGemmaConfig,
                          PaliGemmaForConditionalGeneration)

VOCAB = 512
PG_IMAGE_TOKEN = 511
G3_BOI, G3_EOI, G3_IMAGE_TOKEN = 508, 509, 511
G3_WRAP = 510

_VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
               vision_use_head=False)


def _randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      std = 0.3 if "norm" in name else 0.05
      p.copy_(torch.randn(p.shape, generator=g) * std)


def paligemma2(seed=0, sliding_window=24, query_pre_attn_scalar=24):
  """Gemma 2 text (softcaps, post-norms, GQA 4:2, alternating sliding window),
  query scaling 24**-0.5 != head_dim**-0.5."""
  cfg = PaliGemmaConfig(
      vision_config=dict(_VISION),
      text_config=dict(model_type="gemma2", hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, vocab_size=VOCAB, sliding_window=sliding_window,
                       query_pre_attn_scalar=query_pre_attn_scalar),
      projection_dim=64, image_token_index=PG_IMAGE_TOKEN, vocab_size=VOCAB)
  cfg._attn_implementation = "eager"  # pylint: disable=protected-access
  model = PaliGemmaForConditionalGeneration(cfg).eval()
  _randomize(model, seed)
  return model


def gemma3(seed=0, sliding_window=8, query_pre_attn_scalar=24):
  cfg = Gemma3Config(
      vision_config=dict(_VISION),
      text_config=dict(
          model_type="gemma3_text", hidden_size=64, intermediate_size=128,
          num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          vocab_size=VOCAB, sliding_window=sliding_window,
          query_pre_attn_scalar=query_pre_attn_scalar,
          rope_parameters=dict(
              sliding_attention=dict(rope_type="default", rope_theta=10_000.0),
              full_attention=dict(rope_type="linear", rope_theta=1e6, factor=8.0))),
      mm_tokens_per_image=4, boi_token_index=G3_BOI, eoi_token_index=G3_EOI,
      image_token_index=G3_IMAGE_TOKEN)
  cfg._attn_implementation = "eager"  # pylint: disable=protected-access
  model = Gemma3ForConditionalGeneration(cfg).eval()
  _randomize(model, seed)
  return model


def pixel_values(images: np.ndarray) -> torch.Tensor:
  return torch.tensor(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)


def answer_logprobs(model, image, ids, token_type_ids, n_answer) -> np.ndarray:
  """log p of the last n_answer tokens of `ids`, one unpadded row."""
  with torch.no_grad():
    out = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values(image[None]),
                token_type_ids=torch.tensor([token_type_ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
  lsm = torch.log_softmax(out.logits[0].double(), -1).numpy()
  start = len(ids) - n_answer
  return np.array([lsm[start + j - 1, ids[start + j]] for j in range(n_answer)])
