"""Numerical parity with the transformers reference (CPU torch, float32, eager).

Tiny random models are saved with `save_pretrained`, loaded through
`auditdm_jax.models.load`, and scored on batches with different prompt and
answer lengths (so rows are padded), sequences longer than the sliding window,
and query scaling (24**-0.5) that differs from head_dim (16).
"""

import numpy as np
import pytest
import torch

from auditdm_jax.models.gemma3 import expand_image_tokens
from tests import hf_reference as ref

TOL = 1e-4


@pytest.fixture
def paligemma(hf_pg):
  return hf_pg[0], hf_pg[2]


@pytest.fixture
def gemma3(hf_g3):
  return hf_g3[0], hf_g3[2]


def _text(rng, n):
  return rng.integers(3, 500, n).tolist()


def test_paligemma2_config_read_from_hf(paligemma):
  _, ours = paligemma
  t = ours.config.text
  assert ours.config.family == "paligemma"
  assert t.layer_types == ("local", "global", "local", "global")
  assert t.sliding_window == 24 and t.query_scale == pytest.approx(24 ** -0.5)
  assert t.attn_logits_softcap == 50.0 and t.final_logits_softcap == 30.0


def test_paligemma2_scores_match_transformers(paligemma):
  hf, ours = paligemma
  rng = np.random.default_rng(0)
  n_img = ours.config.num_image_tokens
  # (prompt, answer) lengths: short; total 16+2+30 = 48 > window 24 with the
  # prefix inside it; a prefix of 16+9 = 25 tokens longer than the window.
  lengths = [(5, 4), (2, 30), (9, 1), (1, 12)]
  images = rng.integers(0, 256, (len(lengths), 32, 32, 3), dtype=np.uint8)
  prompts = [[2] + _text(rng, p - 1) for p, _ in lengths]
  answers = [_text(rng, a) for _, a in lengths]
  ours_lp = ours.score(images, prompts, answers)
  worst = 0.0
  for i, (p, a) in enumerate(zip(prompts, answers)):
    ids = [ref.PG_IMAGE_TOKEN] * n_img + p + a
    tt = [0] * (n_img + len(p)) + [1] * len(a)
    expected = ref.answer_logprobs(hf, images[i], ids, tt, len(a))
    assert ours_lp[i].shape == (len(a),)
    worst = max(worst, float(np.abs(expected - ours_lp[i]).max()))
  print(f"paligemma2 parity: max |dlogp| = {worst:.2e}")
  assert worst <= TOL, worst


def test_gemma3_config_read_from_hf(gemma3):
  _, ours = gemma3
  t = ours.config.text
  assert ours.config.family == "gemma3" and t.qk_norm
  assert t.layer_types == ("local",) * 5 + ("global",)
  assert (t.rope_base_local, t.rope_base_global, t.rope_scale_global) == (1e4, 1e6, 8.0)
  assert ours.config.boi_id == ref.G3_BOI and ours.config.image_token_id == ref.G3_IMAGE_TOKEN


def test_gemma3_scores_match_transformers(gemma3):
  hf, ours = gemma3
  rng = np.random.default_rng(1)
  # Image at different offsets; answers up to 25 tokens >> window 8.
  shapes = [(2, 3, 4), (0, 1, 25), (6, 4, 1), (3, 0, 9)]
  images = rng.integers(0, 256, (len(shapes), 32, 32, 3), dtype=np.uint8)
  prompts = [[2] + _text(rng, a) + [ref.G3_BOI] + _text(rng, b) for a, b, _ in shapes]
  answers = [_text(rng, n) for *_, n in shapes]
  ours_lp = ours.score(images, prompts, answers)
  worst = 0.0
  for i, (p, a) in enumerate(zip(prompts, answers)):
    ids = expand_image_tokens(p, ours.config) + a
    tt = [int(t == ref.G3_IMAGE_TOKEN) for t in ids]
    expected = ref.answer_logprobs(hf, images[i], ids, tt, len(a))
    worst = max(worst, float(np.abs(expected - ours_lp[i]).max()))
  print(f"gemma3 parity: max |dlogp| = {worst:.2e}")
  assert worst <= TOL, worst


def test_padding_does_not_change_scores(paligemma):
  _, ours = paligemma
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  prompts, answers = [[2, 7, 8], [2] + _text(rng, 20)], [[9, 10], _text(rng, 17)]
  together = ours.score(images, prompts, answers)
  alone = ours.score(images[:1], prompts[:1], answers[:1])
  np.testing.assert_allclose(together[0], alone[0], atol=1e-5)


def test_greedy_generate_matches_transformers(paligemma):
  hf, ours = paligemma
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  prompts = [[2] + _text(rng, 4), [2] + _text(rng, 7)]
  out = ours.generate(images, prompts, max_new_tokens=10, stop_ids=[])
  n_img = ours.config.num_image_tokens
  for i, p in enumerate(prompts):
    ids = torch.tensor([[ref.PG_IMAGE_TOKEN] * n_img + p])
    with torch.no_grad():
      gen = hf.generate(input_ids=ids, pixel_values=ref.pixel_values(images[i:i + 1]),
                        token_type_ids=torch.zeros_like(ids), do_sample=False,
                        max_new_tokens=10, min_new_tokens=10, eos_token_id=None,
                        pad_token_id=0)
    assert out.tokens[i] == gen[0, ids.shape[1]:].tolist()
    # The returned log-probs are those `score` assigns to the same tokens.
    rescored = ours.score(images[i:i + 1], [p], [out.tokens[i]])[0]
    np.testing.assert_allclose(out.logprobs[i], rescored, atol=1e-4)
