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
   "success_rate_per_seed": {"trained", "warm_start", "budget"},
   "diversity": {"trained", "warm_start"}, "search": {"descriptors", "weights", "seeds",
   "trained_uniform": {"per_probe", "per_seed", "diversity"}}, "archive", "steps",
   "wall_s", ...}

`audit.diversity` (`audit/diversity.py`, docs/audit.md "Diversity"): every
GRPO group asks through a descriptor, probes off their descriptor are paid
as invalid (the frozen warm start judges), and the archive is journaled in
`audit/diversity.jsonl` (rebuilt to the checkpoint's step on resume).

`consensus_truth` is how often the references' consensus is the world's
answer on the valid probes each auditor wrote (not on the benchmark): the
reward is only as truthful as that.

`audit.reward.mode = "judge"`: a judge model (`audit.reward.judge`, any model
of the config, default the first reference) decides the rows where the
exact comparison finds a disagreement (`reward.ModelJudge`); audit.json then
adds `success_rate_exact`, `judge` (how the judge's decisions differ from
the exact ones) and `judge_agreement` / `judge_agreement_seed_questions`
(the judge against exact comparison, docs/audit.md).
"""

from __future__ import annotations

import os
import time

import jax

from auditdm_jax import models, sharding
from auditdm_jax.audit import diversity as diversity_lib
from auditdm_jax.audit import grpo
from auditdm_jax.audit import learner as learner_lib
from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.eval.benchmark import dumps
from auditdm_jax.mine import failure_types as ft
from auditdm_jax.pipeline import editing, judging, layout, placement, sections
from auditdm_jax.pipeline.layout import audit_target, model_dir, roles, seed_source
from auditdm_jax.pipeline.recipes import audit_configs
from auditdm_jax.pipeline.spec import Stage
from auditdm_jax.scenes.text import AUDITOR_TASKS
from auditdm_jax.train import ckpt as ckpt_lib
from auditdm_jax.train import loop as loop_lib
from auditdm_jax.train.metrics import read_metrics


def run(config, workdir: str) -> dict:
  t_stage = time.time()
  if "audit" not in config:
    print("audit: this config has no `audit` section; nothing to do", flush=True)
    return {}
  a = STAGE.settings(config)
  seed = int(config.seed)
  aud_name, target, refs = _names(config)
  tcfg, gcfg, rcfg = audit_configs(config)
  mixture = rollout_lib.check_mixture(dict(a["mixture"]))
  dcfg = diversity_lib.DiversityConfig.from_config(a["diversity"])

  loaded = {name: layout.load_model(workdir, name, "audit")
            for name in [aud_name, target] + refs}
  auditor = loaded[aud_name]
  tcfg = placement.placed(tcfg, config, aud_name)
  mesh = placement.mesh(config)
  trainer = grpo.GRPOTrainer(auditor.config, tcfg, gcfg, mesh)
  warm_params = jax.device_put(auditor.params, trainer.param_shardings)
  auditing = _auditing(config, workdir, a, loaded, aud_name, target, refs, mesh,
                       (gcfg, rcfg, dcfg))
  train_pool, eval_pool, n_eval = _seed_pools(config, workdir, a,
                                              auditor.config.vision.image_size)

  root = os.path.join(workdir, "audit")
  os.makedirs(root, exist_ok=True)
  checkpointer = ckpt_lib.TrainCheckpointer(os.path.join(root, "ckpt"), 2, None)
  mu = gcfg.updates_per_batch
  steps = int(a["steps"])
  try:
    state, latest = loop_lib.resume(checkpointer, trainer,
                                    lambda: trainer.init_state(auditor.params))
    start = int(state["step"]) // mu
    meta = {"opt_paths": trainer.opt_paths, "data_mode": checkpointer.mode,
            "variant": auditor.config.variant, "target": target}
    finds_path = os.path.join(root, "finds.jsonl")
    if sharding.is_primary():
      learner_lib.truncate_finds(finds_path, start)
    journal, adherence = _diversity(config, a, dcfg, root, start, aud_name, auditor, mesh,
                                    warm_params)
    learner = learner_lib.GRPOLearner(
        trainer, auditing, train_pool, mixture, seed=seed,
        prompts_per_step=int(a["prompts_per_step"]), seq_len=int(a["seq_len"]),
        warm_params=warm_params, finds_path=finds_path,
        log_examples=int(a["log_examples"]), journal=journal, adherence=adherence)
    t_train = time.time()
    state, _, _, _ = loop_lib.run(
        state, start, _loop_config(a, steps, mu), learner.step, checkpointer, root, meta, last_saved=latest,
        on_log=learner.on_log,
        postfix=lambda r: {"reward": f"{r['reward']:.3f}",
                           "success": f"{r['success_rate']:.2f}"})
  finally:
    checkpointer.close()
  train_s = time.time() - t_train

  trained = sharding.to_host(state["params"])
  models.VLM(auditor.config, trained, auditor.tokenizer).save(
      model_dir(workdir, layout.trained_name(aud_name)))

  curve = [{"step": r["step"] // mu, "reward": r["reward"], "success_rate": r["success_rate"]}
           for r in read_metrics(os.path.join(root, "metrics.jsonl")) if "reward" in r]
  t_eval = time.time()
  fig, roll_t = _evaluate(auditing, trained, warm_params, eval_pool, n_eval, a, mixture, seed,
                          dcfg, journal)
  ratio = fig.pop("ratio")
  out = {**fig, "steps": steps, "target": target, "references": refs, "ratio": ratio,
         "train_s": train_s, "eval_s": time.time() - t_eval,
         "wall_s": time.time() - t_stage, "learning_curve": curve,
         "examples": learner_lib.find_rows(roll_t, steps, target)[:8]}
  if sharding.is_primary():
    layout.write_summary(workdir, "audit", dumps(out))
  _log(out, n_eval)
  return out


def _names(config) -> tuple[str, str, list[str]]:
  """(the auditor, the audited target, the references); exactly one auditor
  and at least one reference."""
  target = audit_target(config)
  refs = roles(config, "reference")
  auditors = roles(config, "auditor")
  if len(auditors) != 1 or not refs:
    raise ValueError(f"the audit needs exactly one auditor and at least one reference; "
                     f"the config has auditors {auditors} and references {refs}")
  return auditors[0], target, refs


def _loop_config(a, steps: int, mu: int) -> loop_lib.LoopConfig:
  progress = a["progress"]
  return loop_lib.LoopConfig(steps=steps, checkpoint_every=int(a["checkpoint_every"]),
                             log_every=int(a["log_every"]), updates_per_step=mu,
                             name="audit", progress=os.isatty(1) if progress is None
                             else bool(progress), tensorboard=True)


def _auditing(config, workdir, a, loaded, aud_name, target, refs, mesh, cfgs):
  """The rollout's world: the auditor's and answerers' samplers (one
  prompt-length bucket for every question: one compile per answerer), the
  judge, the editor. `cfgs`: the GRPO, reward and diversity configs."""
  gcfg, rcfg, dcfg = cfgs
  auditor = loaded[aud_name]
  bucket = int(a["answer_bucket"])
  answerers = {n: placement.sampler(config, n, loaded[n], mesh, length_bucket=bucket)
               for n in [target] + refs}
  judge, _ = judging.build(config, workdir, rcfg, answerers, loaded, mesh, bucket)
  return rollout_lib.Auditing(
      placement.sampler(config, aud_name, auditor, mesh), answerers, target, refs,
      editing.build(config, mesh, auditor.config.vision.image_size), rcfg,
      num_samples=gcfg.num_samples, temperature=float(a["temperature"]),
      max_new_tokens=int(a["max_new_tokens"]),
      answer_tokens=int(a["answer_tokens"]), judge=judge, diversity=dcfg,
      tasks=AUDITOR_TASKS)


def _seed_pools(config, workdir, a, image_size):
  """(training seeds, the last `audit.eval_budget` seeds held out, their count)."""
  src = seed_source(config, workdir, image_size)
  n_eval = int(a["eval_budget"])
  if len(src) <= n_eval:
    raise ValueError(f"the seed_images split holds {len(src)} images; audit.eval_budget="
                     f"{n_eval} must leave some for training")
  return (learner_lib.SeedPool(src, 0, len(src) - n_eval),
          learner_lib.SeedPool(src, len(src) - n_eval), n_eval)


def _diversity(config, a, dcfg, root, start, aud_name, auditor, mesh, warm_params):
  """(the descriptor archive's journal, the adherence judge), each None when
  `audit.diversity` does not use it."""
  journal = None
  if dcfg.on:   # the archive of the checkpoint's step, rebuilt from its journal
    journal = diversity_lib.Journal(dcfg, os.path.join(root, "diversity.jsonl"))
    journal.resume(start, write=sharding.is_primary())
  adherence = None
  if dcfg.on and dcfg.adherence == "warm_likelihood":   # the frozen warm start judges
    judge_sampler = placement.sampler(config, aud_name, auditor, mesh)
    judge_sampler.set_params(warm_params)   # shares the KL reference's buffers where
                                            # the shardings agree
    adherence = diversity_lib.Adherence(judge_sampler, dcfg,
                                        AUDITOR_TASKS["question"],
                                        batch=int(a["eval_batch"]) * 4)
  return journal, adherence


def _evaluate(auditing, trained, warm_params, eval_pool, n_eval, a, mixture, seed, dcfg,
              journal) -> tuple[dict, list]:
  """The trained and warm-start auditors' search on the held-out seeds: the
  figures of audit.json (with "ratio") and the trained auditor's rollouts."""
  # The trained auditor searches where its archive says the target fails
  # (`audit.diversity.search`); the warm start, which knows nothing of it, evenly.
  asks = {p: "question" in rollout_lib.PAIRINGS[p] for p in mixture}
  weights = (diversity_lib.archive_weights(dcfg, journal.archive, mixture, asks)
             if journal is not None and dcfg.search in ("archive", "thompson") else None)
  fig, roll_t = learner_lib.compare_search(auditing, trained, warm_params, eval_pool, n_eval,
                                           mixture, seed, int(a["eval_batch"]), weights)
  per_seed, div, uniform = _per_seed(auditing, trained, warm_params, eval_pool, a, mixture,
                                     seed, weights)
  fig["success_rate_per_seed"] = per_seed
  fig["diversity"] = div
  fig["search"] = {"descriptors": dcfg.search if weights is not None else "uniform",
                   "weights": weights,
                   "seeds": min(int(a["seed_count"]), len(eval_pool))}
  if weights is not None:     # the same auditor searching evenly, beside it
    _, res_u = learner_lib.evaluate_search(auditing, trained, eval_pool, n_eval, mixture, seed,
                                           int(a["eval_batch"]))
    fig["search"]["trained_uniform"] = dict(uniform, per_probe=res_u["success_rate"])
  if journal is not None:
    fig["archive"] = journal.archive.state()
  return fig, roll_t


def _per_seed(auditing, trained, warm, pool, a, mixture, seed, weights=None
              ) -> tuple[dict, dict, dict]:
  """The paper's per-seed search success at `audit.seed_budget` probes a seed
  on the first `audit.seed_count` held-out seeds, for the trained auditor and
  the warm start, and the diversity of those probes (`diversity_figures`:
  top question share, distinct questions, template entropy, failure
  categories; the scene world's truth only measures). Returns (per seed,
  diversity, and with `weights` the trained auditor searching evenly:
  {"per_seed", "diversity"}, else {})."""
  n = min(int(a["seed_count"]), len(pool))
  budget = int(a["seed_budget"])
  batch = int(a["eval_batch"])
  per_seed, div, uniform = {"budget": budget}, {}, {}
  runs = [("trained", trained, weights), ("warm_start", warm, None)]
  if weights is not None:
    runs.append(("trained_uniform", trained, None))
  for name, params, w in runs:
    fig, roll = learner_lib.search_per_seed(auditing, params, pool, n, budget, mixture,
                                               seed, batch, w)
    skill_of = getattr(auditing.editor, "question_skill", None)
    cats = [ft.category(skill_of(roll.context[i], roll.question[i]) if skill_of else "",
                        roll.consensus[i], roll.factor[i]) for i in range(roll.n)]
    d = dict(learner_lib.probe_diversity(roll, cats), success_rate=fig["success_rate"],
             consensus_truth=rollout_lib.consensus_truth(roll, auditing.editor)[0])
    if name == "trained_uniform":
      uniform = {"per_seed": fig["success"], "diversity": d}
    else:
      per_seed[name], div[name] = fig["success"], d
  return per_seed, div, uniform


def _log(out: dict, n_eval: int) -> None:
  if "judge_agreement" in out:
    ag, jd = out["judge_agreement"], out["judge"]
    print(f"audit: judge {jd['model']!r} vs exact comparison on {ag['rows']} answered, "
          f"consensus-backed held-out probes: agreement {ag['agreement']:.3f}; it calls "
          f"{jd['judge_exact_disagree']['trained']:.3f} of the trained auditor's "
          f"{jd['judged']['trained']} exact disagreements the same", flush=True)
  sr = out["success_rate"]
  tu = (out.get("search") or {}).get("trained_uniform")
  even = f" (searching evenly over its descriptors {tu['per_probe']:.3f})" if tu else ""
  print(f"audit: search success rate at a budget of {n_eval} samples: trained "
        f"{sr['trained']:.3f}{even} vs warm start {sr['warm_start']:.3f}; "
        f"ground-truth precision of the trained auditor's finds {out['precision_gt']:.3f} "
        f"({out['finds_with_ground_truth']} finds); {out['wall_s']:.0f}s", flush=True)
  ps = out.get("success_rate_per_seed")
  if ps:
    even = f" (searching evenly over its descriptors {tu['per_seed']:.3f})" if tu else ""
    print(f"audit: per-seed search success ({ps['budget']} probes on each of "
          f"{out['search']['seeds']} held-out seeds): trained {ps['trained']:.3f}{even} vs "
          f"warm start {ps['warm_start']:.3f}", flush=True)
  divs = dict(out.get("diversity", {}))
  if tu:
    divs["trained, searching evenly,"] = tu["diversity"]
  for name, d in divs.items():
    print(f"audit: {name} auditor's probes: {diversity_lib.describe(d)}, consensus_truth "
          f"{d['consensus_truth']:.3f}", flush=True)


def problems(config) -> list[str]:
  """Problems of the `audit` section (every one, not just the first)."""
  problems = []
  a = STAGE.settings(config)
  for key in ("steps", "prompts_per_step", "eval_budget", "max_new_tokens", "seq_len",
              "checkpoint_every"):
    v = a.get(key, None)
    if not isinstance(v, int) or v < 1:
      problems.append(f"audit.{key} must be an int >= 1, got {v!r}")
  try:
    audit_target(config)
  except ValueError as e:
    problems.append(str(e))
  try:
    rollout_lib.check_mixture(dict(a.get("mixture", {})))
  except (ValueError, TypeError) as e:
    problems.append(f"audit.mixture: {e}")
  try:
    _, _, rcfg = audit_configs(config)
    problems += judging.problems(config, rcfg)
  except (ValueError, TypeError, AttributeError, KeyError) as e:
    problems.append(f"audit: {e}")
  problems += [f"audit.diversity: {p}" for p in
               diversity_lib.check_section(a.get("diversity", None))]
  for key in ("seed_count", "seed_budget"):
    v = a[key]
    if not isinstance(v, int) or v < 1:
      problems.append(f"audit.{key} must be an int >= 1, got {v!r}")
  editor_problems = editing.problems(config, check_inputs=False)   # files: config_check
  problems += editor_problems
  allowed = editing.PAIRINGS.get(a["editor"], None)
  for section in ("audit", "mine") if not editor_problems else ():
    mix = dict(config.get(section, {}).get("mixture", {}) or {})
    bad = sorted(k for k, v in mix.items() if v and allowed is not None and k not in allowed)
    if bad:
      problems.append(f"{section}.mixture: pairings {bad} need an image editor; editor "
                      f"{a['editor']!r} allows only {list(allowed)}")
  seeds = config.get("world", {}).get("seed_images_size", None)
  budget = a.get("eval_budget", None)
  if isinstance(seeds, int) and isinstance(budget, int) and budget >= seeds:
    problems.append(f"audit.eval_budget ({budget}) must be smaller than "
                    f"world.seed_images_size ({seeds}): the rest trains the auditor")
  return problems



STAGE = Stage(
    name="audit", run=run,
    reads="`models/`, seed images (`data/` scene split, or `data.seed_images`), config "
          "(`audit`)",
    writes="`audit/` (GRPO checkpoints, metrics, `finds.jsonl`), `models/<auditor>_trained/`, "
           "`audit.json`",
    section="audit", defaults=sections.AUDIT, problems=problems, needs=("audit", "models"),
    in_rounds=True)
