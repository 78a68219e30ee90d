"""The KV-cache sampler: exactness against transformers, sampling controls,
stop tokens, bounded caches, bucketing, and sharding on 8 host devices."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from auditdm_jax import models
from auditdm_jax.models.gemma3 import expand_image_tokens
from auditdm_jax.sampling import Sampler, SamplingParams, ring_layout
from tests import hf_reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def pg(hf_pg):
  return hf_pg[0], hf_pg[2]


@pytest.fixture
def g3(hf_g3):
  return hf_g3[0], hf_g3[2]


def _prompts(cfg, rng, lengths):
  out = [[2] + rng.integers(3, 500, n).tolist() for n in lengths]
  if cfg.family == "gemma3":
    out = [p[:2] + [cfg.boi_id] + p[2:] for p in out]
  return out


@pytest.mark.parametrize("family", ["paligemma", "gemma3"])
def test_greedy_is_token_exact_with_transformers_generate(family, pg, g3):
  hf, model = pg if family == "paligemma" else g3
  cfg = model.config
  rng = np.random.default_rng(0)
  prompts = _prompts(cfg, rng, (3, 10, 1))
  images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  new = 24  # prefix + 24 exceeds the sliding windows (24 and 8)
  out = Sampler(model).sample(images, prompts, SamplingParams(new, temperature=0.0),
                              stop_ids=[])
  for i, p in enumerate(prompts):
    if family == "paligemma":
      ids = [ref.PG_IMAGE_TOKEN] * cfg.num_image_tokens + p
      tt = [0] * len(ids)
    else:
      ids = expand_image_tokens(p, cfg)
      tt = [int(t == ref.G3_IMAGE_TOKEN) for t in ids]
    ids_t = torch.tensor([ids])
    with torch.no_grad():
      gen = hf.generate(input_ids=ids_t, pixel_values=ref.pixel_values(images[i:i + 1]),
                        token_type_ids=torch.tensor([tt]), do_sample=False,
                        max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                        pad_token_id=0)
    assert out.rows()[i] == gen[0, len(ids):].tolist(), i
  assert np.all(out.lengths == new) and np.all(out.logprobs == 0.0)


@pytest.mark.parametrize("family", ["paligemma", "gemma3"])
def test_sampled_logprobs_match_rescoring(family, pg, g3):
  _, model = pg if family == "paligemma" else g3
  rng = np.random.default_rng(1)
  prompts = _prompts(model.config, rng, (4, 9))
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  sp = SamplingParams(20, temperature=1.0, num_samples=3)
  out = Sampler(model).sample(images, prompts, sp, rng=jax.random.key(5), stop_ids=[])
  assert out.tokens.shape == (6, 20)
  rows = out.rows()
  rescored = model.score(np.repeat(images, 3, 0), [p for p in prompts for _ in range(3)], rows)
  worst = max(float(np.abs(r - out.model_logprobs[i]).max()) for i, r in enumerate(rescored))
  print(f"{family}: sampler vs score max |dlogp| = {worst:.2e}")
  assert worst <= 1e-4
  # Temperature 1 without filtering: the sampling distribution is the model's.
  np.testing.assert_allclose(out.logprobs, out.model_logprobs, atol=1e-5)
  # The samples of one prompt differ from each other.
  assert len({tuple(r) for r in rows[:3]}) > 1


def test_same_key_same_output_and_controls(pg):
  _, model = pg
  s = Sampler(model)
  rng = np.random.default_rng(2)
  prompts = _prompts(model.config, rng, (5, 2))
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  sp = SamplingParams(16, temperature=1.3, top_p=0.9, num_samples=2)
  a = s.sample(images, prompts, sp, rng=jax.random.key(1), stop_ids=[])
  b = s.sample(images, prompts, sp, rng=jax.random.key(1), stop_ids=[])
  c = s.sample(images, prompts, sp, rng=jax.random.key(2), stop_ids=[])
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  # Tempered, nucleus-filtered sampling: log p_sample >= log p_model's
  # renormalised share, and both are finite.
  assert np.all(np.isfinite(a.logprobs)) and np.all(a.logprobs <= 0)
  greedy = s.sample(images, prompts, SamplingParams(16, temperature=0.0), stop_ids=[])
  top1 = s.sample(images, prompts, SamplingParams(16, temperature=1.0, top_k=1),
                  rng=jax.random.key(3), stop_ids=[])
  tiny_p = s.sample(images, prompts, SamplingParams(16, temperature=1.0, top_p=1e-6),
                    rng=jax.random.key(4), stop_ids=[])
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)
  np.testing.assert_allclose(top1.logprobs, 0.0, atol=1e-6)   # a point mass
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match="num_samples"):
    SamplingParams(num_samples=0)


def test_stop_tokens_end_rows_and_pad(pg):
  _, model = pg
  s = Sampler(model)
  rng = np.random.default_rng(3)
  prompts = _prompts(model.config, rng, (4, 6))
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  free = s.sample(images, prompts, SamplingParams(12, temperature=0.0), stop_ids=[])
  stop = free.rows()[0][3]
  out = s.sample(images, prompts, SamplingParams(12, temperature=0.0), stop_ids=[stop])
  for i, row in enumerate(free.rows()):
    n = row.index(stop) + 1 if stop in row else 12
    assert out.lengths[i] == n and out.rows()[i] == row[:n]
    assert np.all(out.tokens[i, n:] == model.config.pad_id)
    assert np.all(out.model_logprobs[i, n:] == 0.0)


def test_sliding_window_layers_keep_a_bounded_cache(g3):
  _, model = g3
  s = Sampler(model)
  t = model.config.text
  lens = s.cache_lengths(prefix_len=40, max_new=100)
  assert [n for n, k in zip(lens, t.layer_types) if k == "local"] == [t.sliding_window] * 5
  assert [n for n, k in zip(lens, t.layer_types) if k == "global"] == [140]
  # Ring slots hold the latest position congruent to the slot index.
  pos = np.asarray(ring_layout(np.array([3, 11]), 4))
  np.testing.assert_array_equal(pos, [[0, 1, 2, -1], [8, 9, 10, 7]])


def test_bfloat16_cache(pg):
  _, model = pg
  rng = np.random.default_rng(4)
  prompts = _prompts(model.config, rng, (6,))
  images = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  sp = SamplingParams(10, temperature=0.0)
  f32 = Sampler(model).sample(images, prompts, sp, stop_ids=[])
  bf16 = Sampler(model, cache_dtype="bfloat16").sample(images, prompts, sp, stop_ids=[])
  np.testing.assert_allclose(bf16.model_logprobs, f32.model_logprobs, atol=0.05)


def test_prompt_length_buckets_avoid_recompiling(pg):
  _, model = pg
  s = Sampler(model)
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  sp = SamplingParams(6, temperature=0.0)
  for lengths in ((3, 5), (9, 2), (14, 1)):      # all within the 16-token bucket
    s.sample(images, _prompts(model.config, rng, lengths), sp)
  assert s.traces == {"prefill": 1, "decode": 1}
  s.sample(images, _prompts(model.config, rng, (20, 3)), sp)   # next bucket
  assert s.traces == {"prefill": 2, "decode": 2}
  for lengths in ((3, 5), (9, 2)):
    s.score(images, _prompts(model.config, rng, lengths), [[5, 6], [7]])
  assert s.traces["score"] == 1


def test_sharded_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_check.py")],
                        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  print("8-device vs 1-device:", json.dumps(res))
  for name in ("paligemma", "gemma3"):
    r = res[name]
    assert r["greedy_equal"] and r["sampled_equal"], r
    assert r["logprob_diff"] < 1e-4 and r["score_diff"] < 1e-4, r
    assert "model" in r["q_spec"] and "fsdp" in r["q_spec"], r   # TP + FSDP both used
    assert "model" in r["gating_spec"] and "fsdp" in r["gating_spec"], r
  # The trainer's (donated) state shares no buffer with other placed copies.
  assert res["donation"] == {"device": 0, "host": 0}, res["donation"]
  # Two models on one mesh, partitioned by different rules.
  assert res["paligemma"]["emb_spec"] != res["gemma3"]["emb_spec"]


def test_set_params_swaps_weights_and_names_a_mismatch():
  from auditdm_jax.models import presets
  cfg = presets.tiny_paligemma2(vocab_size=64, width=16, depth=1, image_size=32,
                                patch_size=16, vision_width=8, vision_depth=1,
                                sliding_window=None)
  a, b = models.VLM.random(cfg, seed=0), models.VLM.random(cfg, seed=1)
  s = Sampler(a)
  s.set_params(b.params)
  leaf = lambda p: np.asarray(jax.tree.leaves(p)[0])  # noqa: E731
  np.testing.assert_array_equal(leaf(s.params), leaf(b.params))
  bad = jax.tree.map(lambda x: x, b.params)
  bad["llm"]["embedder"]["input_embedding"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match="input_embedding"):
    s.set_params(bad)


def test_sample_token_draws_as_jax_categorical_and_argmax():
  """sample_token's faster argmax: greedy picks jnp.argmax's token (ties ->
  the first), sampling draws jax.random.categorical's token for the same key
  (so seeded runs are unchanged), and both report the model's log-probs."""
  from auditdm_jax.sampling import first_argmax, sample_token  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 1000)).astype(np.float32)
  logits[1, [3, 700]] = 50.0                    # a tie: the first index wins
  logits[2, :] = -np.inf
  logits[2, 5] = 1.0
  logits[3, :] = 7.0                            # all equal: index 0
  x = jax.numpy.asarray(logits)
  np.testing.assert_array_equal(first_argmax(x), jax.numpy.argmax(x, axis=-1))
  assert int(first_argmax(x)[1]) == 3 and int(first_argmax(x)[3]) == 0
  tok, _, lpm = sample_token(x, jax.random.key(0), SamplingParams(temperature=0.0))
  np.testing.assert_array_equal(tok, np.argmax(logits, axis=-1))
  lsm = jax.nn.log_softmax(x, axis=-1)
  np.testing.assert_array_equal(lpm, np.take_along_axis(np.asarray(lsm), np.asarray(tok)[:, None], 1)[:, 0])
  for temp, top_k in ((1.0, 0), (0.7, 50)):
    sp = SamplingParams(temperature=temp, top_k=top_k)
    for seed in range(5):
      key = jax.random.key(seed)
      tok, lps, _ = sample_token(x, key, sp)
      scaled = x / temp
      if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jax.numpy.where(scaled < kth, -jax.numpy.inf, scaled)
      want = jax.random.categorical(key, jax.nn.log_softmax(scaled, axis=-1), axis=-1)
      np.testing.assert_array_equal(tok, want)
      assert np.isfinite(np.asarray(lps)).all()
