"""Unit tests of the model layer's pieces: masks, RoPE, resampling, configs,
input validation, dtypes, remat and the reference decoder."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from auditdm_jax import models
from auditdm_jax.models import gemma, presets, siglip
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.gemma3 import expand_image_tokens, interleaved_mask
from auditdm_jax.models.paligemma import prefix_inputs


def test_prefix_lm_mask():
  # 2 prompt tokens (bidirectional), 2 answer tokens (causal), 1 pad.
  m = np.asarray(gemma.make_attn_mask(jnp.array([[1, 1, 1, 1, 0]]), jnp.array([[0, 0, 1, 1, 0]])))[0]
  expected = np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(m, expected)


def test_paligemma_prefix_includes_image_tokens():
  mask, pos, prefix = prefix_inputs(2, jnp.array([[1, 1, 1, 0]]), jnp.array([[0, 1, 1, 0]]))
  mask, pos, prefix = (np.asarray(x)[0] for x in (mask, pos, prefix))
  assert mask[0, 2] and mask[2, 0] and not mask[0, 3] and not mask[3, 4]
  np.testing.assert_array_equal(pos[:5], [0, 1, 2, 3, 4])
  assert prefix[0, 2] and not prefix[0, 3]


def test_sliding_window_rule():
  pos = jnp.arange(6)[None]
  m = np.asarray(gemma.sliding_window_mask(pos, pos, 2))[0]
  assert m[3, 2] and m[3, 4] and not m[3, 1] and not m[3, 5]


def test_gemma3_image_blocks_are_bidirectional_and_separate():
  is_img = jnp.array([[0, 1, 1, 0, 1, 1, 0]], bool)
  m = np.asarray(interleaved_mask(is_img, jnp.ones((1, 7), bool)))[0]
  assert m[1, 2] and m[4, 5]          # inside a block: both directions
  assert m[2, 1] and not m[1, 4]      # no peeking into the next image
  assert not m[0, 1] and m[3, 2]      # text stays causal


def test_rope_is_a_rotation_with_relative_scores():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

  def rot(x, p):
    sin, cos = gemma.rope_tables(jnp.array([[p]]), 8, 10_000.0)
    return gemma.apply_rope(x, sin, cos)

  np.testing.assert_allclose(jnp.linalg.norm(rot(q, 7)), jnp.linalg.norm(q), rtol=1e-5)
  s1 = float(jnp.sum(rot(q, 9) * rot(k, 4)))
  s2 = float(jnp.sum(rot(q, 105) * rot(k, 100)))
  assert s1 == pytest.approx(s2, rel=1e-4)
  # Linear scaling by 8 equals positions divided by 8.
  a = gemma.rope_tables(jnp.array([[16]]), 8, 1e6, scale=8.0)
  b = gemma.rope_tables(jnp.array([[2]]), 8, 1e6)
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)


def test_resample_posemb():
  pe = np.arange(16 * 3, dtype=np.float32).reshape(1, 16, 3)
  assert siglip.resample_posemb(pe, 4) is pe or np.array_equal(siglip.resample_posemb(pe, 4), pe)
  up = siglip.resample_posemb(pe, 7).reshape(7, 7, 3)
  grid = pe.reshape(4, 4, 3)
  np.testing.assert_allclose(up[0, 0], grid[0, 0])
  np.testing.assert_allclose(up[6, 6], grid[3, 3])
  np.testing.assert_allclose(up[0, 3], (grid[0, 1] + grid[0, 2]) / 2)
  with pytest.raises(ValueError, match="square"):
    siglip.resample_posemb(np.zeros((1, 15, 3)), 4)


def test_expand_image_tokens():
  cfg = presets.tiny_gemma3(image_wrap_id=7)
  out = expand_image_tokens([2, 5, cfg.boi_id, 6], cfg)
  assert out == [2, 5, 7, cfg.boi_id] + [cfg.image_token_id] * 4 + [cfg.eoi_id, 7, 6]
  for bad in ([2, 5], [2, cfg.boi_id, cfg.boi_id], [2, cfg.boi_id, cfg.image_token_id]):
    with pytest.raises(ValueError, match="Gemma 3 prompt"):
      expand_image_tokens(bad, cfg)


def test_config_validation():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    dataclasses.replace(presets.tiny_paligemma2().text, num_kv_heads=3)
  with pytest.raises(ValueError, match="sliding_window"):
    dataclasses.replace(presets.tiny_paligemma2().text, sliding_window=None)
  with pytest.raises(ValueError, match="patch_size"):
    siglip.SigLIPConfig(image_size=30, patch_size=8)
  cfg = presets.tiny_paligemma2()
  with pytest.raises(ValueError, match="out_dim"):
    cfg.replace(vision=dataclasses.replace(cfg.vision, out_dim=12))
  assert VLMConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="malformed"):
    VLMConfig.from_dict({"family": "paligemma"})


@pytest.fixture(scope="module")
def tiny_pg():
  return models.VLM.random(presets.tiny_paligemma2(), seed=0)


def test_score_rejects_bad_inputs(tiny_pg):
  img = np.zeros((1, 32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match=r"shape \(1, 32, 32, 3\)"):
    tiny_pg.score(np.zeros((1, 16, 16, 3), np.uint8), [[2]], [[3]])
  with pytest.raises(ValueError, match="uint8"):
    tiny_pg.score(img.astype(np.float32), [[2]], [[3]])
  with pytest.raises(TypeError, match="string"):
    tiny_pg.score(img, ["what colour?"], [[3]])
  with pytest.raises(ValueError, match="outside"):
    tiny_pg.score(img, [[2]], [[9999]])
  with pytest.raises(ValueError, match="empty"):
    tiny_pg.score(img, [[2]], [[]])
  with pytest.raises(ValueError, match="1 prompts but 2 answers"):
    tiny_pg.score(img, [[2]], [[3], [4]])


def test_scores_are_normalised_log_probs(tiny_pg):
  img = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  vocab = tiny_pg.config.text.vocab_size
  lps = tiny_pg.score(np.repeat(img, vocab, 0), [[2, 5]] * vocab, [[v] for v in range(vocab)])
  total = np.logaddexp.reduce(np.array([lp[0] for lp in lps]))
  assert total == pytest.approx(0.0, abs=1e-4)


def test_bfloat16_activations_and_remat():
  cfg = presets.tiny_gemma3()
  params = models.init_params(cfg, jax.random.key(1))
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  prompts = [[2, 5, cfg.boi_id, 6], [2, cfg.boi_id, 7, 8, 9]]
  answers = [[10, 11, 12], [13]]
  ref = models.VLM(cfg, params).score(images, prompts, answers)
  bf16 = models.VLM(cfg.with_dtypes(dtype="bfloat16"), params).score(images, prompts, answers)
  for a, b in zip(ref, bf16):
    np.testing.assert_allclose(a, b, atol=0.1)
  remat_cfg = cfg.replace(text=dataclasses.replace(cfg.text, remat_policy="nothing_saveable"),
                          vision=dataclasses.replace(cfg.vision, remat_policy="nothing_saveable"))
  for a, b in zip(ref, models.VLM(remat_cfg, params).score(images, prompts, answers)):
    np.testing.assert_allclose(a, b, atol=1e-6)

  # Gradients through the scanned, rematerialised layers agree too.
  tokens = jnp.asarray([expand_image_tokens(prompts[0], cfg) + answers[0]])
  mask = jnp.ones_like(tokens, bool)

  def loss(p, c):
    return models.build(c).apply({"params": p}, images[:1], tokens, mask).logits.mean()

  g1 = flax.traverse_util.flatten_dict(jax.grad(loss)(params, cfg))
  g2 = flax.traverse_util.flatten_dict(jax.grad(loss)(params, remat_cfg))
  for k in g1:
    np.testing.assert_allclose(g1[k], g2[k], atol=1e-6, err_msg=str(k))


def test_bfloat16_params_halve_memory():
  cfg = presets.paligemma2("3b", 224)
  f32 = models.abstract_params(cfg)
  bf = models.abstract_params(cfg.with_dtypes(param_dtype="bfloat16"))
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
  assert nbytes(bf) * 2 == nbytes(f32)


def test_generate_sampling_is_reproducible_and_stops(tiny_pg):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  prompts = [[2, 4, 5], [2, 6]]
  a = tiny_pg.generate(images, prompts, 12, temperature=1.0, rng=jax.random.key(3), stop_ids=[])
  b = tiny_pg.generate(images, prompts, 12, temperature=1.0, rng=jax.random.key(3), stop_ids=[])
  c = tiny_pg.generate(images, prompts, 12, temperature=1.0, rng=jax.random.key(4), stop_ids=[])
  assert a.tokens == b.tokens and a.tokens != c.tokens
  assert all(len(t) == 12 for t in a.tokens)
  # Stopping on the first sampled token of row 0 truncates right after it.
  stop = a.tokens[0][0]
  d = tiny_pg.generate(images, prompts, 12, temperature=1.0, rng=jax.random.key(3),
                       stop_ids=[stop])
  assert d.tokens[0] == [stop] and len(d.logprobs[0]) == 1
  with pytest.raises(ValueError, match="temperature"):
    tiny_pg.generate(images, prompts, 4, temperature=-1.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mlp_dense_and_gated_gelu_differentiate_as_autodiff(dtype):
  """The MLP's hand-written pieces (mlp_dense's custom VJP, the checkpointed
  gated_gelu) give autodiff's gradients, to rounding, in either dtype."""
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  dt = jnp.dtype(dtype)
  x = jnp.asarray(rng.normal(size=(3, 5, 16)), dt)
  wg, wu = (jnp.asarray(rng.normal(size=(16, 24)) * 0.2, dt) for _ in range(2))
  wd = jnp.asarray(rng.normal(size=(24, 16)) * 0.2, dt)
  up_to = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)

  def ours(x, wg, wu, wd):
    h = gemma.gated_gelu(gemma.mlp_dense(x, wg), gemma.mlp_dense(x, wu))
    return jnp.sum(gemma.mlp_dense(h, wd).astype(jnp.float32) * up_to)

  def plain(x, wg, wu, wd):
    e = lambda a, w: jnp.einsum("BTD,DF->BTF", a, w)  # noqa: E731
    h = nn.gelu(e(x, wg), approximate=True) * e(x, wu)
    return jnp.sum(e(h, wd).astype(jnp.float32) * up_to)

  got = jax.grad(ours, argnums=(0, 1, 2, 3))(x, wg, wu, wd)
  want = jax.grad(plain, argnums=(0, 1, 2, 3))(x, wg, wu, wd)
  tol = 1e-5 if dtype == "float32" else 2e-2
  for g, w in zip(got, want):
    assert g.dtype == w.dtype == dt and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=tol, atol=tol * float(jnp.max(jnp.abs(w.astype(jnp.float32)))))
  np.testing.assert_allclose(float(ours(x, wg, wu, wd)), float(plain(x, wg, wu, wd)), rtol=tol)
