"""The scene models can learn to select: a regression test of the recipe.

A one- or two-object colour task at reduced size, trained the way the
pretrain stage trains (dense per-cell tower pretraining with row / column
heads, then the LLM through `train.sft.train` with the tower frozen, the
tiny config's post-norm gain). Two-object questions need the model to pick
the referred object (chance is 0.5: either object's colour); before the
recipe was fixed they stayed there for thousands of steps
(docs/scene_world.md). A step count, not a wall-clock limit.
"""

from __future__ import annotations

import json

import flax
import numpy as np
import pytest

from auditdm_jax import models
from auditdm_jax.models import presets
from auditdm_jax.scenes import questions as Q
from auditdm_jax.scenes.text import world_tokenizer
from auditdm_jax.scenes.world import random_scene, render
from auditdm_jax.models import scale_post_norms
from auditdm_jax.train import loss as loss_lib
from auditdm_jax.scenes import tasks, vision
from auditdm_jax.train import sft

STEPS, BATCH = 400, 64


def _scenes(seed: int, n: int) -> list[dict]:
  """Scenes of 1-8 objects for the tower's dense pretraining (as the stage's data)."""
  rng = np.random.default_rng(seed)
  scenes = [random_scene(rng) for _ in range(n)]
  return [{"image": render(s), "scene": s.to_json()} for s in scenes]


def _records(seed: int, n: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    scene = random_scene(rng, min_objects=1, max_objects=2)
    q = Q.q_colour(scene, rng)
    if q is not None:
      out.append({"image": render(scene), "question": q.text, "answer": q.answer,
                  "scene": scene.to_json(), "n": len(scene)})
  return out


def _batches(recs, fn, batch, seed):
  rng = np.random.default_rng(seed)
  while True:
    rows = [fn(recs[i]) for i in rng.integers(0, len(recs), batch)]
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  cfg = presets.get_preset("scene-paligemma2-large")
  tok = world_tokenizer("paligemma")
  train, held = _records(0, 6000), _records(1, 400)
  params = models.VLM.random(cfg, seed=0).params
  img, info = vision.pretrain_vision(
      cfg.vision, params["img"], _batches(_scenes(2, 4000), tasks.cell_label_task, 256, 0), 300,
      position_heads=True, log_every=0)
  task = tasks.VQATask(cfg, tok, 24)
  params = scale_post_norms(dict(params, img=img), 0.1)
  tcfg = sft.TrainConfig(steps=STEPS, lr=1e-3, warmup_steps=50, end_lr=2e-4, b2=0.99,
                         frozen=(r"^img/",), checkpoint_every=10_000, log_every=100,
                         tensorboard=False, progress=False)
  out, _ = sft.train(cfg, params, _batches(train, task, BATCH, 1), tcfg,
                     str(tmp_path_factory.mktemp("learn")), tokenizer=tok)
  return cfg, task, out, img, held, info


def test_the_tower_reads_every_cell_and_its_position(trained):
  *_, info = trained
  # colour, shape, size, row, column of every cell
  assert len(info["accuracy"]) == 5 and min(info["accuracy"]) > 0.95, info["accuracy"]


def test_the_frozen_tower_is_unchanged(trained):
  _, _, out, img, *_ = trained
  before, after = (flax.traverse_util.flatten_dict(t, sep="/") for t in (img, out["img"]))
  assert before.keys() == after.keys()
  for k in before:
    np.testing.assert_array_equal(np.asarray(before[k]), np.asarray(after[k]), err_msg=k)


def test_two_object_selection_leaves_chance(trained):
  cfg, task, params, _, held, _ = trained
  rows = [task(r) for r in held]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  _, ok = loss_lib.token_stats(cfg, params, batch)
  ok = np.asarray(ok | ~np.asarray(loss_lib.loss_mask(batch))).all(-1)
  n = np.array([r["n"] for r in held])
  one, two = ok[n == 1].mean(), ok[n == 2].mean()
  print(json.dumps({"one_object": float(one), "two_objects": float(two)}))
  assert one > 0.95, one
  # chance (either object's colour) is 0.5; the old recipe stayed there
  assert two > 0.75, two
