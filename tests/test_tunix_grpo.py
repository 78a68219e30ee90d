"""bench/grpo.py's premise: on the same batch (images, prompts, completions,
advantages), our GRPO step and tunix's GRPO loss compute the same objective,
so the benchmark times equal work. Reference log-probabilities (tunix's RL
scoring through `tunix_gemma3.with_image_rows`), the loss, its KL and entropy
terms and the gradient's norm (the SigLIP tower frozen on ours, as tunix's
Gemma 3 stops its gradient) must agree. Skipped without tunix
(`pip install -e ".[bench]"`)."""

import jax
import numpy as np
import pytest

pytest.importorskip("tunix")

from auditdm_jax.audit import grpo  # noqa: E402
from auditdm_jax.models import VLM, presets  # noqa: E402
from auditdm_jax.models.inputs import prompt_heads  # noqa: E402
from auditdm_jax.train.config import TrainConfig  # noqa: E402
from bench import tunix_gemma3  # noqa: E402


def _params(cfg, seed):
  """Every weight random, norm scales included (a misplaced tensor shows)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(VLM.random(cfg, 0).params)
  rng = np.random.default_rng(seed)
  std = lambda path: 0.3 if "scale" in jax.tree_util.keystr(path) else 0.08  # noqa: E731
  return jax.tree.unflatten(treedef, [rng.normal(0, std(p), x.shape).astype(np.float32)
                                      for p, x in leaves])


def test_grpo_loss_equals_tunix():
  from flax import nnx
  import jax.numpy as jnp
  from tunix.rl import common, function_registry
  from tunix.rl.grpo import grpo_learner

  cfg = presets.tiny_gemma3(vocab_size=512, width=64, depth=6, image_size=32, patch_size=8,
                            vision_width=32, mm_tokens_per_image=4, sliding_window=8)
  params, ref_params = _params(cfg, 1), _params(cfg, 2)    # the reference differs: KL > 0
  k, n, pad = 2, 6, tunix_gemma3.PAD_ID
  rng = np.random.default_rng(3)
  prompts = [[2, cfg.boi_id] + rng.integers(3, 500, 4).tolist() for _ in range(2)]
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  rows = np.arange(2 * k) // k
  comps = [rng.integers(3, 500, c).tolist() for c in (6, 3, 5, 1)]   # no stop tokens
  adv = np.array([1.0, -1.0, 0.5, -1.5], np.float32)
  heads = prompt_heads(cfg, prompts)
  p = len(heads[0])

  # Ours: the batch the learner builds, the reference's log-probs, one step.
  gcfg = grpo.GRPOConfig(num_samples=k, clip_eps=0.2, kl_beta=0.04, loss_agg="token_mean")
  # tunix's Gemma 3 stops the gradient at the SigLIP output: ours freezes the tower.
  tcfg = TrainConfig(steps=10, lr=1e-3, grad_clip=1.0, frozen=("^img/",))
  trainer = grpo.GRPOTrainer(cfg, tcfg, gcfg)
  batch = grpo.grpo_batch(cfg, images[rows], [prompts[i] for i in rows], comps, adv, p + n,
                          gcfg.loss_agg)
  batch["ref_logp"] = trainer.logprobs(jax.device_put(ref_params, trainer.param_shardings),
                                       batch)
  _, m = trainer.step(trainer.init_state(params), batch)

  # tunix: its RL scoring of the reference and its GRPO loss on the same rows.
  pix = np.repeat(tunix_gemma3.pixels(images), k, axis=0)
  actor = tunix_gemma3.with_image_rows(tunix_gemma3.to_tunix(cfg, params, False), pix)
  ref = tunix_gemma3.with_image_rows(tunix_gemma3.to_tunix(cfg, ref_params, False), pix)
  prompt_ids = jnp.asarray(np.asarray(heads, np.int32)[rows])
  comp = np.full((len(comps), n), pad, np.int32)
  for i, c in enumerate(comps):
    comp[i, :len(c)] = c
  comp = jnp.asarray(comp)
  ref_logps = common.compute_per_token_logps(*nnx.split(ref), prompt_tokens=prompt_ids,
                                             completion_tokens=comp, pad_id=pad, eos_id=pad)
  for i, c in enumerate(comps):
    np.testing.assert_allclose(np.asarray(ref_logps)[i, :len(c)],
                               batch["ref_logp"][i, p:p + len(c)], atol=2e-4)
  example = grpo_learner.TrainExample(
      prompt_ids=prompt_ids, prompt_mask=prompt_ids != pad, completion_ids=comp,
      completion_mask=comp != pad, advantages=jnp.asarray(adv),
      ref_per_token_logps=ref_logps, old_per_token_logps=None)
  algo = grpo_learner.GRPOConfig(num_generations=k, num_iterations=1, beta=0.04, epsilon=0.2,
                                 loss_agg_mode="token-mean", kl_loss_mode="low_var_kl")
  algo.temperature = 1.0                      # GRPOLearner sets it from the rollout config
  loss_fn = function_registry.get_policy_loss_fn("grpo")   # grpo_learner registered it
  (loss, aux), grads = nnx.value_and_grad(
      lambda model: loss_fn(model, example, algo_config=algo, pad_id=pad, eos_id=pad),
      has_aux=True)(actor)

  assert float(m["completion_tokens"]) == sum(len(c) for c in comps)
  np.testing.assert_allclose(float(loss), float(m["loss"]), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(aux["kl"]), float(m["kl"]), rtol=1e-4)
  np.testing.assert_allclose(float(aux["entropy"]), float(m["entropy"]), rtol=1e-4)
  grad_norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))
  np.testing.assert_allclose(grad_norm, float(m["grad_norm"]), rtol=1e-3)
