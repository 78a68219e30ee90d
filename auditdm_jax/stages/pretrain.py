"""`pretrain` stage: give the scene world's models real skills (and gaps).

For every model whose preset is a scene preset (`scene-*`) and that has no
checkpoint of its own:

  1. data     the scene VQA dataset (TFDS array_record) in `world.data_dir`
              (default `<workdir>/data`), built once.
  2. vision   dense per-cell pretraining of one vision tower
              (`scenes.vision`), shared by every model.
  3. base     one PaliGemma 2-architecture base model (`pretrain.base.preset`)
              fine-tuned on the clean VQA data (configs/tiny.py: with the tower
              frozen, `frozen=("^img/",)`): optionally first on some skills
              only (`pretrain.base_first.skills`, a curriculum), then on all,
              then optionally a second phase, `pretrain.base_tune`, e.g. with
              the tower trainable at a low lr. A recipe's `phrase_aux` adds the
              phrase grounding loss (`sft.TrainConfig.phrase_aux`).
  4. derive   each target / reference starts from the base (a shallower
              preset keeps the base's first layers) and
              is fine-tuned with its own seed on data where its planted gaps
              (`models.NAME.gaps`) are corrupted or removed.
  5. auditor  the Gemma 3-architecture auditor gets the shared vision tower
              and a supervised warm start on well-formed questions, edit
              commands and captions.

Every training run checkpoints and resumes (`train.sft`); finished pieces are
recorded in `<workdir>/pretrain.json` and skipped when the stage reruns.
Trained models replace `<workdir>/models/<name>` (our Orbax format, with the
world tokenizer), which later stages load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from auditdm_jax import models, sharding
from auditdm_jax.audit import reward as reward_lib
from auditdm_jax.data import loaders
from auditdm_jax.models import presets
from auditdm_jax.models.ckpt import common as ckpt_common
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.scenes.text import world_tokenizer
from auditdm_jax.pipeline.layout import (ANSWERER_ROLES, ensure_data, is_scene_model, model_dir,
                                         read_summary, write_summary,
                                         scene_source)
from auditdm_jax.pipeline.placement import placed
from auditdm_jax.pipeline.recipes import recipe_config
from auditdm_jax.pipeline.spec import Stage
from auditdm_jax.scenes import tasks, vision
from auditdm_jax.train import sft

# The row length of an answerer trained to judge (`models.<name>.judge_rate`): the
# judge prompt and its answer hold <= 30 ids.
JUDGE_SEQ_LEN = 32

def derive_params(base_params: dict, base_cfg: VLMConfig, cfg: VLMConfig,
                  keep=None) -> dict:
  """Base params reshaped into `cfg`: same widths; a shallower LLM keeps the
  base's layers `keep` (default: the first cfg.text.depth). Measured for the
  2-layer scene target (docs/scene_world.md): layers (0, 1) keep the
  two-phrase comparisons (spatial 0.82, size 0.82 after 600 steps), the first
  and last (0, 3) lose them (0.58, 0.50)."""
  bt, t = base_cfg.text, cfg.text
  same = ("width", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
  diff = [k for k in same if getattr(bt, k) != getattr(t, k)]
  if diff or base_cfg.vision != cfg.vision or t.depth > bt.depth:
    raise ValueError(f"cannot derive {cfg.variant} from {base_cfg.variant}: "
                     f"text fields {diff} differ, or the vision towers differ, or it is "
                     f"deeper ({t.depth} > {bt.depth} layers)")
  keep = np.arange(t.depth) if keep is None else np.asarray(keep, int)
  if keep.shape != (t.depth,) or len(set(keep.tolist())) != t.depth \
      or keep.min() < 0 or keep.max() >= bt.depth:
    raise ValueError(f"cannot derive {cfg.variant}: keep={keep.tolist()} must name "
                     f"{t.depth} distinct layers of the base's {bt.depth}")
  out = jax.tree.map(np.asarray, base_params)
  if t.depth == bt.depth and np.array_equal(keep, np.arange(bt.depth)):
    return out
  out["llm"] = dict(out["llm"])
  out["llm"]["layers"] = jax.tree.map(lambda a: a[keep], out["llm"]["layers"])
  return out


# The base model every scene model is fine-tuned from; not a configured model,
# so the config's partition rules place it.
BASE = "base"


def skill_curve_fn(cfg: VLMConfig, tok, seq_len: int, records):
  """eval_fn(params, step) -> {"acc/SKILL", "acc/overall"}: teacher-forced
  per-skill accuracy (every answer token right) on held-out `records`, the
  truth's answers (no gaps). Measurement only: the learning curves of the
  pretrain runs (pretrain.json `curve`), which never feed training."""
  from auditdm_jax.train import loss as loss_lib  # pylint: disable=import-outside-toplevel
  task = tasks.VQATask(cfg, tok, seq_len)
  rows, skills = [], []
  for r in records:
    try:
      rows.append(task(r))
    except ValueError:      # longer than the rows: not measured
      continue
    skills.append(r["skill"])
  keys = ("images", "tokens", "input_mask", "mask_ar")
  batch = {k: np.stack([row[k] for row in rows]) for k in keys}
  skills = np.asarray(skills)

  @jax.jit
  def correct(params, b):
    _, ok = loss_lib.token_stats(cfg, params, b)
    return jnp.all(ok | ~loss_lib.loss_mask(b), axis=-1)

  def eval_fn(params, step):
    del step
    ok = np.asarray(correct({k: v for k, v in params.items() if k != loss_lib.PHRASE_HEADS},
                            batch))
    out = {f"acc/{s}": float(ok[skills == s].mean()) for s in sorted(set(skills.tolist()))}
    out["acc/overall"] = float(ok.mean())
    return out

  return eval_fn


def read_curve(run_dir: str) -> list[dict]:
  """The eval rows of a training run's metrics.jsonl: [{"step", SKILL: acc, ...}]."""
  from auditdm_jax.train.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  out = {}
  for row in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
    acc = {k[len("eval/acc/"):]: v for k, v in row.items() if k.startswith("eval/acc/")}
    if acc:
      out[int(row["step"])] = {"step": int(row["step"]), **acc}
  return [out[k] for k in sorted(out)]


class _Status:
  def __init__(self, workdir: str):
    self.workdir = workdir
    self.data = read_summary(workdir, "pretrain", {})

  def done(self, key: str) -> bool:
    return key in self.data

  def mark(self, key: str, value: dict) -> None:
    self.data[key] = value
    if sharding.is_primary():
      write_summary(self.workdir, "pretrain", json.dumps(self.data, indent=2))


def _loader(config, workdir, task, batch: int, seed: int):
  # `batch` is global: each process reads its rows of every global batch.
  return loaders.train_loader(scene_source(config, workdir, "train"),
                              batch_size=loaders.process_batch(batch), seed=seed,
                              transforms=[task], shard_mode="batch_rows",
                              worker_count=int(config.world.get("loader_workers", 0)))


def _vqa_task(cfg: VLMConfig, tok, pc, rc, **kw) -> tasks.VQATask:
  """The VQA rows of one recipe `rc`: with phrase labels when it sets
  phrase_aux (on its phrase_skills, default every skill)."""
  return tasks.VQATask(cfg, tok, int(rc.get("seq_len", 0) or pc.seq_len),
                       phrases=bool(rc.get("phrase_aux", 0.0)),
                       phrase_skills=tuple(rc.get("phrase_skills", ())), **kw)


def _save_img(path: str, img: dict) -> None:
  img = sharding.to_host(img)
  if sharding.is_primary():
    tmp = path + ".tmp.npz"
    np.savez(tmp, **ckpt_common.flatten(img))
    os.replace(tmp, path)
  sharding.barrier(f"auditdm vision tower {path}")


def _load_img(path: str) -> dict:
  with np.load(path) as z:
    return flax.traverse_util.unflatten_dict({k: z[k] for k in z.files}, sep="/")


class _Run:
  """What every phase of the stage reads: the config, the workdir, the
  pretrain section, the seed, the done-status and the world tokenizer."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.pc, self.seed = config.pretrain, int(config.seed)
    self.status = _Status(workdir)
    self.root = os.path.join(workdir, "pretrain")
    self.tok = world_tokenizer("paligemma")
    self.base_cfg = presets.get_preset(self.pc.base.preset)
    self._curve_records = None

  def curve_fn(self, cfg: VLMConfig, rc):
    """The learning-curve eval_fn of a recipe that sets eval_every (None
    otherwise): per-skill accuracy on the first `pretrain.curve_records`
    benchmark records."""
    n = int(self.pc.get("curve_records", 0) or 0)
    if not n or not int(rc.get("eval_every", 0) or 0):
      return None
    if self._curve_records is None:
      src = scene_source(self.config, self.workdir, "benchmark")
      self._curve_records = [src[i] for i in range(min(n, len(src)))]
    return skill_curve_fn(cfg, self.tok, int(rc.get("seq_len", 0) or self.pc.seq_len),
                          self._curve_records)

  def loader(self, task, batch: int, seed: int):
    return _loader(self.config, self.workdir, task, batch, seed)


def run(config, workdir: str) -> dict:
  specs = {n: s for n, s in config.models.items() if is_scene_model(s)}
  if not specs or "pretrain" not in config or "world" not in config:
    print("pretrain: no scene-world models in this config; nothing to train", flush=True)
    return {}
  t_stage = time.time()
  r = _Run(config, workdir)
  os.makedirs(r.root, exist_ok=True)
  ensure_data(config, workdir)
  img = _vision(r)
  base_params = _base(r, img)
  results = _answerers(r, specs, base_params)
  results.update(_auditors(r, specs, img))
  print(f"pretrain: done in {time.time() - t_stage:.0f}s", flush=True)
  return results


def _vision(r: _Run) -> dict:
  """2. The vision tower, pretrained on dense per-cell labels."""
  config, workdir, pc, seed, status, root = r.config, r.workdir, r.pc, r.seed, r.status, r.root
  base_cfg = r.base_cfg
  vision_path = os.path.join(root, "vision.npz")
  if not (status.done("vision") and os.path.exists(vision_path)):
    params = models.VLM.random(base_cfg, seed=seed).params
    it = _loader(config, workdir, tasks.cell_label_task, int(pc.vision.batch), seed)
    img, info = vision.pretrain_vision(base_cfg.vision, params["img"], it,
                                       int(pc.vision.steps), lr=float(pc.vision.lr),
                                       position_heads=bool(pc.vision.get("position_heads",
                                                                         False)),
                                       count_heads=bool(pc.vision.get("count_heads", False)))
    _save_img(vision_path, img)
    status.mark("vision", info)
  img = _load_img(vision_path)
  return img


def _base(r: _Run, img) -> dict:
  """3. The base answering model (an optional curriculum first, an optional
  second phase after); returns its parameters."""
  config, workdir, pc, seed, status, root = r.config, r.workdir, r.pc, r.seed, r.status, r.root
  base_cfg, tok = r.base_cfg, r.tok
  base_dir = os.path.join(root, "base")
  first = pc.get("base_first")
  first_on = bool(first) and int(first.get("steps", 0)) > 0
  if not status.done("base"):
    params = models.VLM.random(base_cfg, seed=seed).params
    params = models.scale_post_norms(dict(params, img=img), float(pc.get("post_norm_init", 1.0)))
    # -- 3a. optional first phase on some skills only (a curriculum) ----------
    if first_on:
      first_dir = os.path.join(root, "base_first")
      if not status.done("base_first"):
        task = _vqa_task(base_cfg, tok, pc, first, skills=tuple(first.get("skills", ())))
        it = _loader(config, workdir, task, int(first.get("batch", pc.base.batch)), seed + 2)
        tcfg = dataclasses.replace(placed(recipe_config(first, seed + 2), config, BASE),
                                 export_final=True)
        _, summary = sft.train(base_cfg, params, it, tcfg, first_dir, tokenizer=tok)
        status.mark("base_first", dict(summary, skills=list(first.get("skills", ()))))
      params = jax.tree.map(np.asarray, models.load(os.path.join(first_dir, "final")).params)
    task = _vqa_task(base_cfg, tok, pc, pc.base)
    it = _loader(config, workdir, task, int(pc.base.batch), seed)
    tcfg = dataclasses.replace(placed(recipe_config(pc.base, seed), config, BASE),
                               export_final=True)
    _, summary = sft.train(base_cfg, params, it, tcfg, base_dir, tokenizer=tok,
                           eval_fn=r.curve_fn(base_cfg, pc.base))
    status.mark("base", dict(summary, curve=read_curve(base_dir)))
  # -- 3b. optional second base phase (e.g. the tower unfrozen at a low lr) ----
  if pc.get("base_tune") and int(pc.base_tune.get("steps", 0)) > 0:
    tune_dir = os.path.join(root, "base_tune")
    if not status.done("base_tune"):
      params = models.load(os.path.join(base_dir, "final")).params
      task = _vqa_task(base_cfg, tok, pc, pc.base_tune)
      it = _loader(config, workdir, task, int(pc.base_tune.get("batch", pc.base.batch)),
                   seed + 1)
      tcfg = dataclasses.replace(placed(recipe_config(pc.base_tune, seed + 1), config, BASE),
                                 export_final=True)
      _, summary = sft.train(base_cfg, params, it, tcfg, tune_dir, tokenizer=tok)
      status.mark("base_tune", summary)
    base_dir = tune_dir
  base_params = jax.tree.map(np.asarray, models.load(os.path.join(base_dir, "final")).params)
  return base_params


def _answerers(r: _Run, specs, base_params) -> dict:
  """4. The targets (with their planted gaps) and references, fine-tuned from the base."""
  config, workdir, pc, seed, status, root = r.config, r.workdir, r.pc, r.seed, r.status, r.root
  base_cfg, tok = r.base_cfg, r.tok
  results = {}
  for i, (name, spec) in enumerate(sorted(specs.items())):
    if spec.role not in ANSWERER_ROLES:
      continue
    gaps = tuple(spec.get("gaps", ()))
    judge_rate = float(spec.get("judge_rate", 0.0) or 0.0)
    if status.done(name) and os.path.exists(model_dir(workdir, name)):
      old = status.data[name]
      if (list(old.get("gaps", [])) == list(gaps) and old.get("preset") == spec.preset
          and float(old.get("judge_rate", 0.0)) == judge_rate):
        results[name] = old
        continue
      # Trained for other gaps (or another preset, judge rate): train it
      # again from the base, not from its old checkpoints.
      print(f"pretrain: {name} was trained with gaps {old.get('gaps')} ({old.get('preset')}, "
            f"judge rate {old.get('judge_rate', 0.0)}); the config asks for {list(gaps)} "
            f"({spec.preset}, judge rate {judge_rate}): training it again", flush=True)
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    cfg = presets.get_preset(spec.preset)
    params = derive_params(base_params, base_cfg, cfg)
    rc = pc.finetune
    if judge_rate:      # judge rows are longer than the VQA ones
      rc = ml_collections.ConfigDict(dict(rc.to_dict(), seq_len=max(
          int(rc.get("seq_len", 0) or pc.seq_len), JUDGE_SEQ_LEN)))
    task = _vqa_task(cfg, tok, pc, rc, gaps=gaps,
                     gap_mode=str(spec.get("gap_mode", "corrupt")), judge_rate=judge_rate,
                     judge_prompt=reward_lib.judge_prompt if judge_rate else None)
    mseed = seed + 101 * (i + 1)
    it = _loader(config, workdir, task, int(pc.finetune.batch), mseed)
    if spec.get("finetune_steps", 0):        # a model that needs more steps (a shallower one)
      rc = ml_collections.ConfigDict(dict(rc.to_dict(), steps=int(spec.finetune_steps)))
    params, summary = sft.train(cfg, params, it, placed(recipe_config(rc, mseed), config, name),
                                os.path.join(root, name), tokenizer=tok,
                                eval_fn=r.curve_fn(cfg, rc))
    models.VLM(cfg, sharding.to_host(params), tok).save(model_dir(workdir, name))
    results[name] = dict(summary, gaps=list(gaps), preset=spec.preset, judge_rate=judge_rate,
                         curve=read_curve(os.path.join(root, name)))
    status.mark(name, results[name])
    print(f"pretrain: {name} ({spec.role}, {spec.preset}, gaps {list(gaps)}) trained "
          f"{summary['steps']} steps, final loss {summary['final'].get('loss', float('nan')):.4f}",
          flush=True)
  return results


def _auditors(r: _Run, specs, img) -> dict:
  """5. The auditor's warm start on the routes the audit uses."""
  config, workdir, pc, seed, status, root = r.config, r.workdir, r.pc, r.seed, r.status, r.root
  results = {}
  atok = world_tokenizer("gemma3")
  for name, spec in sorted(specs.items()):
    if spec.role != "auditor":
      continue
    rate = float(pc.auditor.get("descriptor_rate", 0.0) or 0.0)
    if status.done(name) and os.path.exists(model_dir(workdir, name)):
      old = status.data[name]
      if (float(old.get("descriptor_rate", 0.0)) == rate
          and old.get("task_version", 1) == tasks.AUDITOR_TASK_VERSION):
        results[name] = old
        continue
      print(f"pretrain: {name} was warm-started with descriptor rate "
            f"{old.get('descriptor_rate', 0.0)} (task version {old.get('task_version', 1)}); "
            f"the config asks for {rate} (version {tasks.AUDITOR_TASK_VERSION}): training "
            f"it again", flush=True)
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    cfg = presets.get_preset(spec.preset)
    params = models.VLM.random(cfg, seed=seed + 7).params
    params = models.scale_post_norms(dict(params, img={k: v for k, v in img.items() if k != "head"}),
                              float(pc.get("post_norm_init", 1.0)))
    task = tasks.AuditorTask(cfg, atok, int(pc.auditor.seq_len), seed=seed,
                             routes=tuple(pc.auditor.get("routes", tasks.ROUTES)),
                             descriptor_rate=rate)
    it = _loader(config, workdir, task, int(pc.auditor.batch), seed + 7)
    params, summary = sft.train(cfg, params, it,
                                placed(recipe_config(pc.auditor, seed + 7), config, name),
                                os.path.join(root, name), tokenizer=atok)
    models.VLM(cfg, sharding.to_host(params), atok).save(model_dir(workdir, name))
    results[name] = dict(summary, preset=spec.preset, descriptor_rate=rate,
                         task_version=tasks.AUDITOR_TASK_VERSION)
    status.mark(name, results[name])
    print(f"pretrain: {name} (auditor, {spec.preset}) trained {summary['steps']} steps, "
          f"final loss {summary['final'].get('loss', float('nan')):.4f}", flush=True)
  return results


def problems(config) -> list[str]:
  """The pretrain recipes' curriculum skills and phrase-loss weights."""
  problems: list[str] = []
  pc = config.get("pretrain", None)
  if not pc:
    return problems
  from auditdm_jax.scenes.questions import SKILLS  # pylint: disable=import-outside-toplevel
  for name in ("base_first", "base", "base_tune", "finetune"):
    rc = pc.get(name, None)
    if not rc:
      continue
    w = rc.get("phrase_aux", 0.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
      problems.append(f"pretrain.{name}.phrase_aux must be a number >= 0, got {w!r}")
    ps = rc.get("phrase_skills", ())
    if isinstance(ps, str) or any(k not in SKILLS for k in ps):
      problems.append(f"pretrain.{name}.phrase_skills must be a list of {SKILLS}, got {ps!r}")
  aud = pc.get("auditor", None)
  if aud:
    from auditdm_jax.audit.rollout import PAIRINGS  # pylint: disable=import-outside-toplevel
    from auditdm_jax.scenes.text import AUDITOR_TASKS  # pylint: disable=import-outside-toplevel
    known = tuple(AUDITOR_TASKS)   # as scenes.tasks.ROUTES
    rate = aud.get("descriptor_rate", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
      problems.append(f"pretrain.auditor.descriptor_rate must be in [0, 1], got {rate!r}")
    routes = aud.get("routes", known)
    if isinstance(routes, str) or not routes or any(r not in known for r in routes):
      problems.append(f"pretrain.auditor.routes must be a non-empty list of {known}, "
                      f"got {routes!r}")
    elif "audit" in config:
      used = {t for p, w in dict(config.audit.get("mixture", {})).items() if w
              for t in PAIRINGS.get(p, ())}
      missing = sorted(used - set(routes))
      if missing:
        problems.append(f"audit.mixture asks the auditor for {missing} texts, but "
                        f"pretrain.auditor.routes {tuple(routes)} does not warm-start them")
  first = pc.get("base_first", None)
  if first and int(first.get("steps", 0) or 0) > 0:
    skills = first.get("skills", ())
    if isinstance(skills, str) or not skills or any(k not in SKILLS for k in skills):
      problems.append(f"pretrain.base_first.skills must be a non-empty list of {SKILLS}, "
                      f"got {skills!r}")
  return problems




STAGE = Stage(
    name="pretrain", run=run, reads="config (`world`, `pretrain`, model `gaps`)",
    writes="`data/` (TFDS scene VQA), `pretrain/` (training runs), trained `models/<name>/`, "
           "`pretrain.json`",
    section="pretrain", problems=problems)
