"""`audit` stage: train the auditor with GRPO against one target and the references.

Every step draws `prompts_per_step` seed images (a deterministic function of
the run's seed and the step, so a resumed run sees what an uninterrupted one
would), gives each a pairing from the mixture, samples K auditor texts per
seed (`audit.rollout`), scores them with the jitted disagreement reward and
takes a GRPO step (`audit.grpo`) with a k3 KL to the warm-start auditor.

Writes under `<workdir>/audit/`: Orbax checkpoints (`ckpt/`, resumed on
restart), `metrics.jsonl` + TensorBoard (mean reward, search success rate,
consensus rate, invalid-output rate, KL, entropy, distinct outputs, ...),
`finds.jsonl` (successful finds, with every model's answer) and the trained
auditor in our format (`<workdir>/models/<auditor>_trained`). Then it
measures the search success rate of the trained and the warm-start auditor
on the same held-out seeds at the same sample budget, and the ground-truth
precision of the trained auditor's finds, into `<workdir>/audit.json`:

  {"budget", "success_rate": {"trained", "warm_start"}, "precision_gt",
   "consensus_truth": {"trained", "warm_start"}, "success_by_pairing",
   "steps", "wall_s", ...}

`consensus_truth` is how often the references' consensus is the world's
answer on the valid probes each auditor wrote (not on the benchmark): the
reward is only as truthful as that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from auditdm_jax import models, sharding
from auditdm_jax.audit import editor as editor_lib
from auditdm_jax.audit import grpo
from auditdm_jax.audit import reward as reward_lib
from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.data import named
from auditdm_jax.eval.benchmark import dumps
from auditdm_jax.sampling import Sampler
from auditdm_jax.stages import pretrain
from auditdm_jax.stages.init_models import model_dir
from auditdm_jax.train import ckpt as ckpt_lib
from auditdm_jax.train import preemption
from auditdm_jax.train import sft
from auditdm_jax.train.metrics import MetricsWriter, read_metrics
from auditdm_jax.utils.fileio import atomic_write_text


def roles(config, role: str) -> list[str]:
  return sorted(n for n, s in config.models.items() if s.role == role)


def audit_target(config) -> str:
  targets = roles(config, "target")
  name = config.audit.get("target", "") or (targets[0] if targets else "")
  if name not in targets:
    raise ValueError(f"audit.target {name!r} is not a model with role 'target' "
                     f"(targets: {targets})")
  return name


def configs_from(config) -> tuple[sft.TrainConfig, grpo.GRPOConfig, reward_lib.RewardConfig]:
  a = config.audit
  o = a.optim
  steps = int(a.steps) * int(a.grpo.get("updates_per_batch", 1))
  tcfg = sft.TrainConfig(
      steps=steps, lr=float(o.lr), warmup_steps=o.get("warmup", 0.1),
      end_lr=float(o.get("end_lr", 0.0)), weight_decay=float(o.get("weight_decay", 0.0)),
      b2=float(o.get("b2", 0.999)), grad_clip=float(o.get("grad_clip", 1.0)),
      grad_accum=int(o.get("grad_accum", 1)), frozen=tuple(o.get("frozen", ())),
      seed=int(config.seed), mesh=dict(a.get("mesh", {"data": 1, "fsdp": -1, "model": 1})),
      progress=False, tensorboard=True)
  gcfg = grpo.GRPOConfig(**dict(a.grpo))
  rcfg = reward_lib.RewardConfig(**dict(a.reward))
  return tcfg, gcfg, rcfg


def seed_source(config, workdir: str, image_size: int):
  """The seed images: `data.seed_images` (a named TFDS / jsonl dataset, read
  at `image_size`) when the config names one, else the scene world's
  `seed_images` split (built by pretrain if missing)."""
  spec = config.get("data", {}).get("seed_images", None)
  if spec:
    return named.open_source(dict(spec), image_size)
  pretrain.ensure_data(config, workdir)
  return pretrain.source(config, workdir, "seed_images")


class SeedPool:
  """Seed images (image, context, seed question) of a seed source: the scene
  world's (context: the scene) or a named dataset's (no context)."""

  def __init__(self, src, start: int = 0, stop: int | None = None):
    self.src = src
    self.start, self.stop = start, len(src) if stop is None else min(stop, len(src))
    if self.stop - self.start < 1:
      raise ValueError(f"the seed-image pool [{start}, {stop}) is empty "
                       f"(the split holds {len(src)} records)")

  def __len__(self) -> int:
    return self.stop - self.start

  def get(self, indices) -> list[rollout_lib.Seed]:
    out = []
    for i in indices:
      r = self.src[self.start + int(i) % len(self)]
      out.append(rollout_lib.Seed(np.asarray(r["image"]), r.get("scene", None),
                                  r["question"]))
    return out


def _step_rng(seed: int, step: int) -> np.random.Generator:
  return np.random.default_rng([seed, 7919, step])


def build_batch(cfg, roll: rollout_lib.Rollout, advantages, seq_len: int, second_rows: int,
                loss_agg: str) -> dict[str, np.ndarray]:
  """GRPO rows, packed: every sample's first text, then the second texts of
  the two-text samples, then zero-weight placeholders up to `second_rows`
  (`rollout.second_text_budget`), so the batch shape never changes and a
  one-text sample costs one row, not two."""
  firsts = list(range(roll.n))
  seconds = [i for i in range(roll.n) if len(roll.texts[i]) > 1]
  if len(seconds) > second_rows:
    raise ValueError(f"{len(seconds)} second texts exceed the batch's budget of "
                     f"{second_rows} rows (rollout.second_text_budget)")
  images, prompts, comps, adv, live = [], [], [], [], []
  for i, j in [(i, 0) for i in firsts] + [(i, 1) for i in seconds]:
    images.append(roll.images_in[i][j])
    prompts.append(roll.prompts[i][j])
    comps.append(roll.tokens[i][j] or [0])
    adv.append(advantages[i])
    live.append(True)
  for _ in range(second_rows - len(seconds)):   # placeholders: any valid row, masked out
    images.append(roll.images_in[0][0])
    prompts.append(roll.prompts[0][0])
    comps.append(roll.tokens[0][0] or [0])
    adv.append(0.0)
    live.append(False)
  batch = grpo.grpo_batch(cfg, np.stack(images), prompts, comps, np.asarray(adv), seq_len,
                          loss_agg)
  batch["loss_mask"] &= np.asarray(live)[:, None]
  batch["weights"] = np.asarray(grpo.aggregation_weights(batch["loss_mask"], loss_agg))
  return batch


def _find_rows(roll: rollout_lib.Rollout, step: int, target: str) -> list[dict]:
  out = []
  for i in np.nonzero(roll.success)[0]:
    out.append({"step": step, "pairing": roll.pairings[i], "texts": roll.texts[i],
                "question": roll.question[i], "factor": roll.factor[i],
                "context": roll.context[i], "consensus": roll.consensus[i],
                "target": target, "answers": {k: v[i] for k, v in roll.answers.items()}})
  return out


def step_metrics(roll: rollout_lib.Rollout, editor=None) -> dict[str, float]:
  """Per-step figures; with the editor, `consensus_truth` too (how often the
  references' consensus is the ground truth on this step's probes; NaN when
  the editor knows no truth). Measurement only, never the reward."""
  firsts = [t[0] for t in roll.texts]
  valid = np.maximum(roll.valid.sum(), 1)
  out = {"reward": float(roll.reward.mean()), "success_rate": float(roll.success.mean()),
         "consensus_rate": float(roll.has_consensus.mean()),
         "invalid_rate": float(1.0 - roll.valid.mean()),
         "unanswered_rate": float((roll.valid & ~roll.answered).sum() / valid),
         "distinct": len(set(firsts)) / max(len(firsts), 1)}
  if editor is not None:
    out["consensus_truth"] = rollout_lib.consensus_truth(roll, editor)[0]
  return out


def evaluate_search(auditing: rollout_lib.Auditing, params, pool: SeedPool, budget: int,
                    mixture, seed: int, batch: int) -> tuple[rollout_lib.Rollout, dict]:
  """One sample per held-out seed, `budget` seeds, with `params` as the policy."""
  auditing.auditor.params = jax.device_put(params, auditing.auditor.param_shardings)
  rng = np.random.default_rng([seed, 104729])
  pairings = rollout_lib.draw_pairings(mixture, budget, rng)
  rolls = []
  for start in range(0, budget, batch):
    idx = list(range(start, min(start + batch, budget)))
    idx += [idx[0]] * (batch - len(idx))              # fixed shape; extra rows dropped
    roll = auditing.run(pool.get(idx), [pairings[i] for i in idx],
                        jax.random.key(seed * 1000 + start), num_samples=1)
    keep = min(batch, budget - start)
    rolls.append((roll, keep))
  success = np.concatenate([r.success[:k] for r, k in rolls])
  valid = np.concatenate([r.valid[:k] for r, k in rolls])
  merged = _merge([r for r, _ in rolls], [k for _, k in rolls])
  return merged, {"success_rate": float(success.mean()), "valid_rate": float(valid.mean())}


def _merge(rolls, keeps) -> rollout_lib.Rollout:
  def cat(field):
    vals = [getattr(r, field)[:k] for r, k in zip(rolls, keeps)]
    if isinstance(vals[0], np.ndarray):
      return np.concatenate(vals)
    return [x for v in vals for x in v]
  by_model = ("answers", "parsed")
  kw = {f.name: cat(f.name) for f in dataclasses.fields(rollout_lib.Rollout)
        if f.name not in by_model}
  for field in by_model:
    kw[field] = {m: [a for r, k in zip(rolls, keeps) for a in getattr(r, field)[m][:k]]
                 for m in getattr(rolls[0], field)}
  return rollout_lib.Rollout(**kw)


def run(config, workdir: str) -> dict:
  t_stage = time.time()
  if "audit" not in config:
    print("audit: this config has no `audit` section; nothing to do", flush=True)
    return {}
  a = config.audit
  seed = int(config.seed)
  target = audit_target(config)
  refs = roles(config, "reference")
  auditors = roles(config, "auditor")
  if len(auditors) != 1 or not refs:
    raise ValueError(f"the audit needs exactly one auditor and at least one reference; "
                     f"the config has auditors {auditors} and references {refs}")
  aud_name = auditors[0]
  tcfg, gcfg, rcfg = configs_from(config)
  mixture = rollout_lib.check_mixture(dict(a.mixture))
  second_rows = rollout_lib.second_text_budget(mixture, int(a.prompts_per_step),
                                               gcfg.num_samples)

  loaded = {}
  for name in [aud_name, target] + refs:
    path = model_dir(workdir, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"audit: model {name!r} has no checkpoint at {path}; run "
                              "the init and pretrain stages first")
    loaded[name] = models.load(path)
  auditor = loaded[aud_name]
  mesh = sharding.make_mesh(dict(tcfg.mesh))
  trainer = grpo.GRPOTrainer(auditor.config, tcfg, gcfg, mesh)
  warm_params = jax.device_put(auditor.params, trainer.param_shardings)
  # One prompt-length bucket for every question (one compile per answerer).
  bucket = int(a.get("answer_bucket", 32))
  answerers = {n: Sampler(loaded[n], mesh, length_bucket=bucket) for n in [target] + refs}
  auditing = rollout_lib.Auditing(
      Sampler(auditor, mesh), answerers, target, refs, editor_lib.get_editor(a.editor), rcfg,
      num_samples=gcfg.num_samples, temperature=float(a.temperature),
      max_new_tokens=int(a.max_new_tokens),
      answer_tokens=int(a.get("answer_tokens", 4)))

  src = seed_source(config, workdir, auditor.config.vision.image_size)
  n_eval = int(a.eval_budget)
  if len(src) <= n_eval:
    raise ValueError(f"the seed_images split holds {len(src)} images; audit.eval_budget="
                     f"{n_eval} must leave some for training")
  train_pool = SeedPool(src, 0, len(src) - n_eval)
  eval_pool = SeedPool(src, len(src) - n_eval)

  root = os.path.join(workdir, "audit")
  os.makedirs(root, exist_ok=True)
  checkpointer = ckpt_lib.TrainCheckpointer(os.path.join(root, "ckpt"), 2, None)
  latest = checkpointer.latest_step()
  if latest is not None:
    state, _ = checkpointer.restore(latest, trainer.abstract_state(), trainer.opt_paths)
  else:
    state = trainer.init_state(auditor.params)
  mu = gcfg.updates_per_batch
  start = int(state["step"]) // mu
  steps = int(a.steps)
  meta = {"opt_paths": trainer.opt_paths, "data_mode": checkpointer.mode,
          "variant": auditor.config.variant, "target": target}
  writer = MetricsWriter(root, start * mu, tensorboard=True, enabled=sharding.is_primary())
  finds_path = os.path.join(root, "finds.jsonl")
  if sharding.is_primary():
    _truncate_finds(finds_path, start)
  bar = None
  if a.get("progress", None) or (a.get("progress", None) is None and os.isatty(1)):
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=steps, initial=start, desc="audit", dynamic_ncols=True)
  t_train = time.time()
  stop = preemption.StopOnSignal().__enter__()   # SIGTERM: save at the step, then exit
  try:
    for step in range(start, steps):
      t0 = time.perf_counter()
      rng = _step_rng(seed, step)
      idx = rng.integers(0, len(train_pool), int(a.prompts_per_step))
      pairings = rollout_lib.draw_pairings(mixture, len(idx), rng)
      auditing.auditor.params = jax.device_put(state["params"], auditing.auditor.param_shardings)
      roll = auditing.run(train_pool.get(idx), pairings, jax.random.key(seed * 100_003 + step))
      adv = np.asarray(grpo.group_advantages(roll.reward, gcfg.num_samples, gcfg.adv_eps,
                                             gcfg.scale_rewards))
      batch = build_batch(auditor.config, roll, adv, int(a.seq_len), second_rows,
                          gcfg.loss_agg)
      batch["ref_logp"] = trainer.logprobs(warm_params, batch)
      if mu > 1:
        batch["old_logp"] = trainer.logprobs(state["params"], batch)
      local = sharding.local_rows(batch)   # every process holds the same rollouts
      for _ in range(mu):
        state, m = trainer.step(state, local)
        if not m["finite"]:
          raise sft.NonFiniteLossError(
              f"audit: non-finite GRPO loss at step {step + 1}: loss={float(m['loss'])}, "
              f"grad_norm={float(m['grad_norm'])}; the update was not applied and the last "
              f"checkpoint in {checkpointer.directory} is intact")
      row = step_metrics(roll, auditing.editor)
      row.update({k: float(m[k]) for k in ("loss", "kl", "entropy", "clip_frac", "grad_norm")})
      row["lr"] = float(trainer.schedule(int(state["step"]) - 1))
      row["step_time"] = time.perf_counter() - t0
      finds = _find_rows(roll, step + 1, target)
      if finds and sharding.is_primary():
        with open(finds_path, "a") as f:
          f.writelines(json.dumps(r) + "\n" for r in finds)
      log_every = int(a.get("log_every", 10))
      if (step + 1) % log_every == 0 or step + 1 == steps:
        writer.write((step + 1) * mu, row)
        for r in finds[:int(a.get("log_examples", 2))]:
          print(f"audit: find [{r['pairing']}] {r['texts']} -> Q {r['question']!r}: "
                f"{target} says {r['answers'][target]!r}, references say "
                f"{r['consensus']!r}", flush=True)
      stopping = stop.requested()
      if (step + 1) % int(a.checkpoint_every) == 0 or step + 1 == steps or stopping:
        checkpointer.save(int(state["step"]), state, dict(meta, step=int(state["step"])))
      if bar is not None:
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", success=f"{row['success_rate']:.2f}",
                        refresh=False)
      if stopping and step + 1 < steps:
        raise stop.stop(f"at audit step {step + 1} of {steps}; checkpoint saved in "
                        f"{checkpointer.directory}")
  finally:
    stop.__exit__(None, None, None)
    writer.close()
    checkpointer.close()
    if bar is not None:
      bar.close()
  train_s = time.time() - t_train

  trained = sharding.to_host(state["params"])
  models.VLM(auditor.config, trained, auditor.tokenizer).save(
      model_dir(workdir, f"{aud_name}_trained"))

  curve = [{"step": r["step"] // mu, "reward": r["reward"], "success_rate": r["success_rate"]}
           for r in read_metrics(os.path.join(root, "metrics.jsonl")) if "reward" in r]
  t_eval = time.time()
  batch_n = int(a.get("eval_batch", 64))
  roll_t, res_t = evaluate_search(auditing, trained, eval_pool, n_eval, mixture, seed, batch_n)
  roll_w, res_w = evaluate_search(auditing, warm_params, eval_pool, n_eval, mixture, seed,
                                  batch_n)
  prec, n_known = rollout_lib.precision_gt(roll_t, auditing.editor)
  truth = {name: rollout_lib.consensus_truth(r, auditing.editor)[0]
           for name, r in (("trained", roll_t), ("warm_start", roll_w))}
  by_pairing = {p: float(roll_t.success[[i for i in range(roll_t.n)
                                         if roll_t.pairings[i] == p]].mean())
                for p in sorted(set(roll_t.pairings))}
  out = {"budget": n_eval,
         "success_rate": {"trained": res_t["success_rate"], "warm_start": res_w["success_rate"]},
         "valid_rate": {"trained": res_t["valid_rate"], "warm_start": res_w["valid_rate"]},
         "precision_gt": prec, "finds_with_ground_truth": n_known,
         "consensus_truth": truth, "success_by_pairing": by_pairing,
         "unanswered_rate": {"trained": float(np.mean(roll_t.valid & ~roll_t.answered)),
                             "warm_start": float(np.mean(roll_w.valid & ~roll_w.answered))},
         "steps": steps, "target": target, "references": refs,
         "ratio": (res_t["success_rate"] / res_w["success_rate"]
                   if res_w["success_rate"] > 0 else float("inf")),
         "train_s": train_s, "eval_s": time.time() - t_eval,
         "wall_s": time.time() - t_stage, "learning_curve": curve,
         "examples": _find_rows(roll_t, steps, target)[:8]}
  if sharding.is_primary():
    atomic_write_text(os.path.join(workdir, "audit.json"), dumps(out))
  print(f"audit: search success rate at a budget of {n_eval} samples: trained "
        f"{res_t['success_rate']:.3f} vs warm start {res_w['success_rate']:.3f}; "
        f"ground-truth precision of the trained auditor's finds {prec:.3f} "
        f"({n_known} finds); {time.time() - t_stage:.0f}s", flush=True)
  return out


def _truncate_finds(path: str, last_step: int) -> None:
  """Drops finds logged after `last_step` (a resumed run logs them again)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  atomic_write_text(path, "".join(rows))
