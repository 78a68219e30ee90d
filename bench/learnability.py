"""Controlled learnability harness for the scene models (docs/scene_world.md).

Trains one scene-world answering model (built by `vlm.build`, the project's
loss `loss_lib.loss_fn`, rows made by `tasks.VQATask` from `scenes.examples`) on a
chosen set of skills, changing one factor at a time, and prints held-out
per-skill accuracy (every answer token right, teacher-forced) at fixed steps.

  python bench/learnability.py --skills=spatial --steps=1500
  python bench/learnability.py --skills=all --steps=3000 --position_heads=0
  python bench/learnability.py --skills=spatial2 --steps=1000 --eval_every=200

Probe kinds besides the eight skills (questions on 2-8 object scenes unless
named): where (the referred object's column), where2 (its column or row),
colour_probe (its colour), spatialN (spatial questions on N-object scenes),
spatialL (spatial questions whose second object is in the middle column /
row). A comma list mixes kinds round-robin.

Factors: --preset, --depth, --heads, --position_heads (row / column heads in
the tower's dense pretraining), --frozen (the tower frozen while the LLM learns),
--lr / --warmup / --end_lr / --batch, --post_norm_init. Everything runs in
one process on this machine's CPU; records are generated in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import re
import time

import numpy as np


def probe_example(seed: int, index: int, probe: str) -> dict:
  """A two-to-eight-object scene and a one-object question of the probe kind:
  "where" reads the referred object's column (left / middle / right),
  "colour" its colour; the same scenes and referring phrases for both."""
  import json  # pylint: disable=import-outside-toplevel,redefined-outer-name
  from auditdm_jax.scenes import questions as Q  # pylint: disable=import-outside-toplevel
  from auditdm_jax.scenes.edits import COL_NAMES, ROW_NAMES  # pylint: disable=import-outside-toplevel
  from auditdm_jax.scenes.world import random_scene, render  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng([seed, index])
  if probe in ("spatialC", "spatialA"):  # spatialA: the object always in the first slot                # one object against the centre, either slot
    while True:
      scene = random_scene(rng, min_objects=1)
      obj = scene.objects[int(rng.integers(len(scene)))]
      ref = Q.unique_ref(scene, obj)
      horiz = rng.random() < 0.5
      pos = obj.col if horiz else obj.row
      if ref and pos != 1:
        break
    words = ("left", "right") if horiz else ("above", "below")
    if probe == "spatialA" or rng.random() < 0.5:     # the object in the first slot
      q, a = f"is the {ref} {words[0]} or {words[1]} of the centre?", words[pos // 2]
    else:                      # in the second slot: the centre is left of a right object
      q, a = f"is the centre {words[0]} or {words[1]} of the {ref}?", words[1 - pos // 2]
    if not horiz:
      q = q.replace("of the", "the")
    return {"image": render(scene), "question": q, "answer": a, "skill": probe,
            "facets": json.dumps({"answer": a}), "scene": scene.to_json()}
  if probe.startswith("spatial"):       # spatialN: spatial questions on N-object scenes
    landmark = probe == "spatialL"        # the second object in the middle column / row
    n = 0 if landmark or probe == "spatialR" else int(probe[len("spatial"):])
    while True:
      scene = random_scene(rng, min_objects=n or 2, max_objects=n or 8)
      q = Q.q_spatial(scene, rng)
      if q is not None and probe == "spatialR":   # role: the colour of the first / second
        refs = q.text.rstrip("?").split(" the ")[1:]
        refs = [refs[0].replace(" left or right of", "").replace(" above or below", ""),
                refs[-1]]
        objs = [[o for o in scene.objects if Q.unique_ref(scene, o) == r] for r in refs]
        if not all(objs):
          continue
        k = int(rng.integers(2))
        text, a = f"{('first', 'second')[k]} colour {q.text}", objs[k][0].colour
        return {"image": render(scene), "question": text, "answer": a, "skill": probe,
                "facets": json.dumps({"answer": a}), "scene": scene.to_json()}
      if q is not None and landmark:
        words = q.text.rstrip("?").split(" the ")
        b = [o for o in scene.objects if Q.unique_ref(scene, o) == words[-1]]
        if not b or (b[0].col if "left" in q.text else b[0].row) != 1:
          continue
      if q is not None:
        return {"image": render(scene), "question": q.text, "answer": q.answer,
                "skill": probe, "facets": json.dumps({"answer": q.answer}),
                "scene": scene.to_json()}
  while True:
    scene = random_scene(rng, min_objects=2)
    obj = scene.objects[int(rng.integers(len(scene)))]
    ref = Q.unique_ref(scene, obj, avoid=("colour",))
    if ref:
      break
  if probe == "where" or (probe == "where2" and rng.random() < 0.5):
    q, a = f"which column is the {ref} in?", COL_NAMES[obj.col]
  elif probe == "where2":
    q, a = f"which row is the {ref} in?", ROW_NAMES[obj.row]
  else:
    q, a = f"what colour is the {ref}?", obj.colour
  return {"image": render(scene), "question": q, "answer": a, "skill": probe,
          "facets": json.dumps({"answer": a}), "scene": scene.to_json()}


def _records(args):
  seed, start, stop, skills = args
  from auditdm_jax.scenes import examples  # pylint: disable=import-outside-toplevel
  probes = {"where": "where", "where2": "where2", "colour_probe": "colour",
            **{f"spatial{n}": f"spatial{n}" for n in range(2, 9)}, "spatialL": "spatialL",
            "spatialC": "spatialC", "spatialA": "spatialA",
            "spatialR": "spatialR"}
  return [probe_example(seed, i, probes[skills[i % len(skills)]])
          if skills[i % len(skills)] in probes else examples.example(seed, i, skills)
          for i in range(start, stop)]


def make_records(seed: int, n: int, skills: tuple[str, ...], workers: int = 2) -> list[dict]:
  chunks = [(seed, i, min(n, i + 2000), skills) for i in range(0, n, 2000)]
  if workers <= 1:
    return [r for c in chunks for r in _records(c)]
  with mp.get_context("fork").Pool(workers) as pool:
    return [r for part in pool.map(_records, chunks) for r in part]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--skills", default="all")
  ap.add_argument("--preset", default="scene-paligemma2-large")
  ap.add_argument("--depth", type=int, default=0, help="LLM depth (0: the preset's)")
  ap.add_argument("--width", type=int, default=0, help="LLM width (0: the preset's)")
  ap.add_argument("--heads", type=int, default=0, help="LLM heads (0: the preset's)")
  ap.add_argument("--first", default="", help="kinds trained for --first_steps steps first")
  ap.add_argument("--first_steps", type=int, default=0)
  ap.add_argument("--restart", type=int, default=1,
                  help="with --first: the lr schedule restarts (warm-up, decay) per phase")
  ap.add_argument("--phrase_aux", type=float, default=0.0,
                  help="weight of an auxiliary loss: on spatial questions, each referring "
                       "phrase's last token predicts its object's row and column")
  ap.add_argument("--aux_mode", default="phrase",
                  help="phrase: the heads read each phrase's last token; final: slot-specific "
                       "heads read the prompt's last token (where the answer is predicted)")
  ap.add_argument("--aux_after", type=float, default=-1.0,
                  help="phrase_aux weight after the --first phase (-1: the same)")
  ap.add_argument("--phrase_skills", default="all",
                  help="skills whose questions carry phrase targets (tasks.phrase_labels), "
                       "a comma list or 'all'")
  ap.add_argument("--steps", type=int, default=1500)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--warmup", type=int, default=100)
  ap.add_argument("--end_lr", type=float, default=2e-4)
  ap.add_argument("--b2", type=float, default=0.99)
  ap.add_argument("--post_norm_init", type=float, default=0.1)
  ap.add_argument("--vision_steps", type=int, default=300)
  ap.add_argument("--position_heads", type=int, default=1)
  ap.add_argument("--count_heads", type=int, default=0,
                  help="per-cell heads in the tower's pretraining: how many objects share "
                       "the cell's colour / shape")
  ap.add_argument("--frozen", type=int, default=1)
  ap.add_argument("--train_size", type=int, default=30_000)
  ap.add_argument("--eval_size", type=int, default=1_000)
  ap.add_argument("--eval_every", type=int, default=500)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--seq_len", type=int, default=24)
  ap.add_argument("--out", default="")
  args = ap.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from auditdm_jax import models  # pylint: disable=import-outside-toplevel
  from auditdm_jax.models import presets  # pylint: disable=import-outside-toplevel
  from auditdm_jax.scenes import questions as Q  # pylint: disable=import-outside-toplevel
  from auditdm_jax.scenes.text import world_tokenizer  # pylint: disable=import-outside-toplevel
  from auditdm_jax.models import scale_post_norms  # pylint: disable=import-outside-toplevel
  from auditdm_jax.train import loss as loss_lib  # pylint: disable=import-outside-toplevel
  from auditdm_jax.scenes import tasks, vision  # pylint: disable=import-outside-toplevel

  skills = Q.SKILLS if args.skills == "all" else tuple(args.skills.split(","))
  t0 = time.time()
  train = make_records(args.seed, args.train_size, skills)
  held = make_records(args.seed + 1_000_003, args.eval_size, skills)
  first = make_records(args.seed + 7, args.train_size,
                       tuple(args.first.split(","))) if args.first else []
  print(f"records: {len(train)} train, {len(held)} held out in {time.time() - t0:.0f}s",
        flush=True)

  cfg = presets.get_preset(args.preset)
  text = cfg.text
  if args.depth:
    text = dataclasses.replace(text, depth=args.depth, scan_unroll=args.depth)
  if args.width:
    text = dataclasses.replace(text, width=args.width, mlp_dim=4 * args.width,
                               head_dim=args.width // text.num_heads)
  if args.heads:
    text = dataclasses.replace(text, num_heads=args.heads, num_kv_heads=args.heads,
                               head_dim=text.width // args.heads)
  vis = dataclasses.replace(cfg.vision, out_dim=text.width)
  cfg = dataclasses.replace(cfg, text=text, vision=vis)
  tok = world_tokenizer("paligemma")
  task = tasks.VQATask(cfg, tok, args.seq_len)
  def stack(recs):
    rows = [task(r) for r in recs]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  data, ev = stack(train), stack(held)
  def aux_targets(recs):
    keep = None if args.phrase_skills == "all" else set(args.phrase_skills.split(","))
    lab = np.stack([tasks.phrase_labels(r, tok) if keep is None or r["skill"] in keep
                    else -np.ones((tasks.MAX_PHRASES, 3), np.int32) for r in recs])
    lab[..., 0] = np.where(lab[..., 0] >= 0, lab[..., 0] + cfg.num_image_tokens, -1)
    return lab
  def to_final(lab, rows):
    if args.aux_mode == "final":     # every slot reads the prompt's last token
      last = cfg.num_image_tokens + (rows["input_mask"] & (rows["mask_ar"] == 0)).sum(1) - 1
      lab = lab.copy()
      lab[..., 0] = np.where(lab[..., 0] >= 0, last[:, None], -1)
    return lab
  data1 = stack(first) if first else None
  if args.phrase_aux:
    data["aux"] = to_final(aux_targets(train), data)
    if data1 is not None:
      data1["aux"] = to_final(aux_targets(first), data1)
  ev_skill = np.array([r["skill"] for r in held])

  params = models.VLM.random(cfg, seed=args.seed).params
  rng = np.random.default_rng(args.seed)
  t0 = time.time()
  def cell_batches():
    while True:
      idx = rng.integers(0, len(train), 256)
      yield {"images": data["images"][idx],
             "labels": np.stack([tasks.cell_labels(train[i]["scene"]) for i in idx])}
  img, info = vision.pretrain_vision(cfg.vision, params["img"], cell_batches(),
                                     args.vision_steps, position_heads=bool(args.position_heads),
                                     count_heads=bool(args.count_heads),
                                     log_every=0)
  print(f"vision: {args.vision_steps} steps, cell accuracy "
        f"{np.round(info['accuracy'], 3).tolist()} in {time.time() - t0:.0f}s", flush=True)
  params = scale_post_norms(dict(params, img=img), args.post_norm_init)
  params = jax.tree.map(jnp.asarray, params)

  if args.phrase_aux:      # training-only heads of the auxiliary loss (trained, never frozen)
    shape = (2, cfg.text.width, 3) if args.aux_mode == "final" else (cfg.text.width, 3)
    params = dict(params, aux_row=jnp.zeros(shape), aux_col=jnp.zeros(shape))
  sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, args.end_lr)
  if args.first and args.restart:   # each phase its own warm-up and decay (as the stage's phases)
    sched = optax.join_schedules(
        [optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.first_steps,
                                            args.end_lr),
         optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup,
                                            args.steps - args.first_steps, args.end_lr)],
        [args.first_steps])
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=args.b2,
                                                                weight_decay=0.0))
  if args.frozen:
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if re.match(r"^img/", "/".join(str(getattr(k, "key", k)) for k in p))
        else "train", params)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  from auditdm_jax.models import vlm  # pylint: disable=import-outside-toplevel
  module = vlm.build(cfg)
  def total_loss(q, batch):
    q, heads = ({k: v for k, v in q.items() if not k.startswith("aux_")},
                {k: v for k, v in q.items() if k.startswith("aux_")})
    loss, _ = loss_lib.loss_fn(cfg, q, batch)
    if not args.phrase_aux:
      return loss
    h = module.apply({"params": q}, batch["images"], batch["tokens"], batch["input_mask"],
                     batch["mask_ar"], return_hidden=True).hidden   # [B, n_img + T, D]
    t = batch["aux"]                                                # [B, 2, 3]
    valid = t[..., 0] >= 0
    hp = jnp.take_along_axis(h, jnp.maximum(t[..., 0], 0)[..., None], axis=1)  # [B, 2, D]
    aux = 0.0
    for j, head in enumerate(("aux_row", "aux_col")):
      logits = (jnp.einsum("bpd,pdc->bpc", hp.astype(jnp.float32), heads[head])
                if args.aux_mode == "final" else hp.astype(jnp.float32) @ heads[head])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(t[..., 1 + j], 0))
      aux += jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(valid.sum(), 1)
    return loss + jnp.mean(batch["aux_w"]) * aux
  opt = tx.init(params)

  @jax.jit
  def step(p, s, batch):
    loss, g = jax.value_and_grad(lambda q: total_loss(q, batch))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  @jax.jit
  def correct(p, batch):
    p = {k: v for k, v in p.items() if not k.startswith("aux_")}
    _, ok = loss_lib.token_stats(cfg, p, batch)
    m = loss_lib.loss_mask(batch)
    return jnp.all(ok | ~m, axis=-1)

  def evaluate(p):
    ok = np.concatenate([np.asarray(correct(p, {k: v[i:i + 250] for k, v in ev.items()}))
                         for i in range(0, len(ev_skill), 250)])
    out = {s: float(ok[ev_skill == s].mean()) for s in skills}
    out["overall"] = float(ok.mean())
    return out

  curve = []
  t0 = time.time()
  keys = ("images", "tokens", "input_mask", "mask_ar") + (("aux",) if args.phrase_aux else ())
  for i in range(1, args.steps + 1):
    src = data1 if (data1 is not None and i <= args.first_steps) else data
    idx = rng.integers(0, len(src["tokens"]), args.batch)
    b = {k: src[k][idx] for k in keys}
    if args.phrase_aux:
      w = args.phrase_aux if (args.aux_after < 0 or (data1 is not None and i <= args.first_steps)) \
          else args.aux_after
      b["aux_w"] = np.full((args.batch,), w, np.float32)
    params, opt, loss = step(params, opt, b)
    if i % args.eval_every == 0 or i == args.steps:
      acc = evaluate(params)
      curve.append({"step": i, "loss": float(loss), "wall_s": time.time() - t0, **acc})
      print(f"step {i}: loss {float(loss):.4f} " +
            " ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f" ({time.time() - t0:.0f}s)",
            flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "curve": curve}, f, indent=1)


if __name__ == "__main__":
  main()
