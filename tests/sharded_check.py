"""Run by tests/test_sampling.py in a subprocess with 8 host CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): samples and scores the
same tiny models on a 1-device mesh and on data=2 x fsdp=2 x model=2, with two
models sharing the 8-device mesh under different partition rules, and prints
a JSON summary of the differences."""

import json
import sys

import jax
import numpy as np

from auditdm_jax import models, sharding
from auditdm_jax.models import presets
from auditdm_jax.sampling import Sampler, SamplingParams


def run(model, mesh, rules=None):
  s = Sampler(model, mesh=mesh, rules=rules)
  rng = np.random.default_rng(0)
  cfg = model.config
  images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  prompts = [[2] + rng.integers(3, 400, n).tolist() for n in (3, 7, 1, 12)]
  if cfg.family == "gemma3":
    prompts = [p[:2] + [cfg.boi_id] + p[2:] for p in prompts]
  greedy = s.sample(images, prompts, SamplingParams(max_new_tokens=12, temperature=0.0),
                    stop_ids=[])
  sampled = s.sample(images, prompts, SamplingParams(max_new_tokens=12, temperature=1.0,
                                                     top_k=50, num_samples=2),
                     rng=jax.random.key(7), stop_ids=[])
  scores = s.score(images, prompts, [r[:5] for r in greedy.rows()])
  specs = jax.tree.map(lambda a: str(a.sharding.spec), s.params)
  return greedy, sampled, scores, specs


def main():
  assert jax.device_count() == 8, jax.device_count()
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  out = {}
  pg = models.VLM.random(presets.tiny_paligemma2(), seed=1)
  g3 = models.VLM.random(presets.tiny_gemma3(), seed=2)
  # The auditor keeps its vocabulary replicated: per-model rules on one mesh.
  g3_rules = [[r"(^|/)embedder/input_embedding$", [None, None]]] + [
      list(r) for r in sharding.PARAM_RULES]
  for name, model, rules in (("paligemma", pg, None), ("gemma3", g3, g3_rules)):
    g1, s1, sc1, _ = run(model, one, rules)
    g8, s8, sc8, specs = run(model, eight, rules)
    out[name] = {
        "greedy_equal": g1.rows() == g8.rows(),
        "sampled_equal": s1.rows() == s8.rows(),
        "logprob_diff": float(np.abs(s1.model_logprobs - s8.model_logprobs).max()),
        "score_diff": float(max(np.abs(a - b).max() for a, b in zip(sc1, sc8))),
        "q_spec": specs["llm"]["layers"]["attn"]["q_einsum"]["w"],
        "emb_spec": specs["llm"]["embedder"]["input_embedding"],
        "gating_spec": specs["llm"]["layers"]["mlp"]["gating_einsum"],
    }
  out["donation"] = donation_check(pg)
  json.dump(out, sys.stdout)


def donation_check(model) -> dict:
  """A trainer's state must not share buffers with other arrays placed from
  the same parameters (the GRPO KL reference): its step donates the state.
  Checked for device-resident (VLM.random) and host (numpy) parameters."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  from auditdm_jax.train import sft  # pylint: disable=import-outside-toplevel
  tcfg = dataclasses.replace(sft.TrainConfig(steps=1, lr=1e-3),
                             mesh=(("data", 1), ("fsdp", 8), ("model", 1)))
  out = {}
  for kind, params in (("device", model.params),
                       ("host", jax.tree.map(np.asarray, model.params))):
    trainer = sft.Trainer(model.config, tcfg)
    other = jax.device_put(params, trainer.param_shardings)
    state = trainer.init_state(params)
    ptrs = lambda a: {sh.data.unsafe_buffer_pointer() for sh in a.addressable_shards}  # noqa: E731
    out[kind] = sum(bool(ptrs(a) & ptrs(b)) for a, b in
                    zip(jax.tree.leaves(other), jax.tree.leaves(state["params"])))
  return out


if __name__ == "__main__":
  main()
