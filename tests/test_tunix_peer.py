"""bench/tunix_gemma3.py: our Gemma 3 weights converted into tunix's model
decode, through tunix's KV-cache Sampler, exactly the greedy tokens of our
Sampler (the equality the sampling benchmark relies on). Skipped without
tunix (`pip install -e ".[bench]"`)."""

import jax
import numpy as np
import pytest

pytest.importorskip("tunix")

from auditdm_jax.models import VLM, presets  # noqa: E402
from auditdm_jax.sampling import Sampler, SamplingParams  # noqa: E402
from bench import tunix_gemma3  # noqa: E402


def _model(num_kv_heads, head_dim, query_pre_attn_scalar, seed=0):
  """A tiny Gemma 3 VLM (sliding window 8, 2x2-pooled image tokens) whose
  every weight, norm scales included, is random, so a misplaced tensor shows."""
  cfg = presets.tiny_gemma3(vocab_size=512, width=64, depth=6, image_size=32, patch_size=8,
                            vision_width=32, mm_tokens_per_image=4, sliding_window=8,
                            num_kv_heads=num_kv_heads, head_dim=head_dim,
                            query_pre_attn_scalar=query_pre_attn_scalar)
  params = VLM.random(cfg, seed).params
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  std = lambda path: 0.3 if "scale" in jax.tree_util.keystr(path) else 0.08  # noqa: E731
  leaves = [rng.normal(0, std(path), x.shape).astype(np.float32) for path, x in leaves]
  return VLM(cfg, jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("num_kv_heads,head_dim,scalar", [
    (2, 16, None),    # GQA (q_einsum + kv_einsum), queries scaled by head_dim
    (4, 32, 16),      # MHA (qkv_einsum), scaled by width / num_heads != head_dim
])
def test_tunix_greedy_tokens_equal_ours(num_kv_heads, head_dim, scalar):
  model = _model(num_kv_heads, head_dim, scalar)
  cfg = model.config
  rng = np.random.default_rng(1)
  # Rows of different lengths (tunix pads on the left, we on the right);
  # prompt + new tokens run well past the sliding window of 8.
  prompts = [[2, cfg.boi_id] + rng.integers(3, 500, n).tolist() for n in (3, 9, 1)]
  images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  new = 20
  ours = Sampler(model).sample(images, prompts, SamplingParams(new, temperature=0.0),
                               stop_ids=[])
  peer = tunix_gemma3.TunixGemma3(model, cache_size=64)
  tokens, logits = peer.generate(images, prompts, new, return_logits=True)
  assert tokens.tolist() == ours.rows()
  ref = tunix_gemma3.last_prompt_logits(model, images, prompts)
  prefill = np.stack([row[0] for row in logits])
  assert np.abs(prefill - ref).max() < 1e-4


def test_unsupported_features_are_named():
  cfg = presets.tiny_gemma3(attn_logits_softcap=50.0, query_pre_attn_scalar=24)
  with pytest.raises(ValueError, match="soft-capping.*query_pre_attn_scalar 24"):
    tunix_gemma3.tunix_config(cfg)
