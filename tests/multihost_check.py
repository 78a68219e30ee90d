"""One sharded fine-tuning run as 2 JAX processes x 4 CPU devices, or as 1
process x 8 devices, for tests/test_multihost.py to compare:

  python tests/multihost_check.py one WORKDIR OUT.npz
  python tests/multihost_check.py two WORKDIR OUT.npz PROCESS_ID PORT

Both train the same global batches (process p feeds rows [4p, 4p + 4) of
each 8-row batch), save and restore Orbax checkpoints, and write the final
parameters (gathered across processes) from process 0. Then, as the audit
stage does: sharded sampling (every process passes the same rows and gets
all the samples back), the log-probs of a GRPO batch, and one GRPO step
(each process feeds its share of the batch).
"""

import dataclasses
import json
import os
import sys

MODE = sys.argv[1]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 if MODE == 'one' else 4}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

if MODE == "two":
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{sys.argv[5]}", num_processes=2,
                             process_id=int(sys.argv[4]))

import grain  # noqa: E402
import numpy as np  # noqa: E402

from auditdm_jax import sharding  # noqa: E402
from auditdm_jax.train import train  # noqa: E402
from auditdm_jax.train.metrics import read_metrics  # noqa: E402
from tests import test_train as tt  # noqa: E402

TCFG = dataclasses.replace(tt.BASE, steps=4, checkpoint_every=2, eval_every=0,
                           keep_checkpoints=None, mesh=(("data", 2), ("fsdp", 4), ("model", 1)))


def data():
  rows = tt.BATCH // jax.process_count()
  p = jax.process_index()
  ds = (grain.MapDataset.range(64).shuffle(seed=3).map(tt.example).repeat().batch(tt.BATCH)
        .map(lambda b: {k: v[p * rows:(p + 1) * rows] for k, v in b.items()}))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def grpo_round(params) -> dict[str, np.ndarray]:
  """Samples 2 continuations of 8 prompts, scores them and takes a GRPO step."""
  from auditdm_jax.audit import grpo  # pylint: disable=import-outside-toplevel
  from auditdm_jax.models.handle import VLM  # pylint: disable=import-outside-toplevel
  from auditdm_jax.sampling import Sampler, SamplingParams  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(dict(TCFG.mesh))
  rows = [tt.example(i) for i in range(8)]
  images = np.stack([r["images"] for r in rows])
  prompts = [[2, 5 + i, 108] for i in range(8)]
  sampler = Sampler(VLM(tt.CFG, params, None), mesh)
  out = sampler.sample(images, prompts, SamplingParams(max_new_tokens=5, temperature=1.0,
                                                       num_samples=2),
                       rng=jax.random.key(7), stop_ids=[1])
  comps = [list(r) + [1] for r in out.rows()]
  adv = np.linspace(-1.0, 1.0, len(comps)).astype(np.float32)
  batch = grpo.grpo_batch(tt.CFG, np.repeat(images, 2, axis=0), [p for p in prompts for _ in (0, 1)],
                          comps, adv, 12, "token_mean")
  tcfg = dataclasses.replace(TCFG, steps=1, checkpoint_every=1, warmup_steps=0)
  trainer = grpo.GRPOTrainer(tt.CFG, tcfg, grpo.GRPOConfig(num_samples=2), mesh)
  batch["ref_logp"] = trainer.logprobs(jax.device_put(params, trainer.param_shardings), batch)
  state = trainer.init_state(params)
  state, m = trainer.step(state, sharding.local_rows(batch))
  new = sharding.to_host(state["params"])
  return {"tokens": np.asarray(out.tokens), "ref_logp": batch["ref_logp"],
          "loss": np.asarray(m["loss"]), "kl": np.asarray(m["kl"]),
          "embedding": np.asarray(new["llm"]["embedder"]["input_embedding"])}


def main():
  workdir, out = sys.argv[2], sys.argv[3]
  assert jax.device_count() == 8, jax.device_count()
  params, summary = train(tt.CFG, tt.init_params(), data(), TCFG, workdir)
  final = sharding.to_host(params)
  # Restore: a second run finds the step-4 checkpoint and returns it unchanged.
  again, summary2 = train(tt.CFG, None, data(), TCFG, workdir)
  restored = sharding.to_host(again)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final),
                                                   jax.tree.leaves(restored)))
  rl = grpo_round(final)
  if sharding.is_primary():
    np.savez(out, **tt.flat_np(final), **{f"rl/{k}": v for k, v in rl.items()})
    losses = [r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))]
    print("RESULT " + json.dumps({
        "processes": jax.process_count(), "steps": summary["steps"],
        "resumed": summary2["resumed"], "restored_equal": same, "losses": losses,
        "checkpoints": summary["checkpoints"],
        "batch_global_rows": int(tt.BATCH)}), flush=True)


if __name__ == "__main__":
  main()
