"""Scene VQA examples: the records of the training set and of the benchmark.

A record is a flat dict of numpy-friendly values:
  image     uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]
  question  str        answer  str        skill  str
  facets    str (JSON object of the question's facets, see questions.py)
  scene     str (Scene.to_json(), the ground truth)
Skills are interleaved round-robin so every prefix of a split is balanced.
Records are a pure function of (seed, index): record i of a split can be
regenerated alone, which is what makes the data builders deterministic and
resumable.
"""

from __future__ import annotations

import json

import numpy as np

from auditdm_jax.scenes import questions as Q
from auditdm_jax.scenes.world import render

# Seeds of the named splits; the benchmark never shares scenes with training
# by construction (different seed streams).
SPLIT_SEEDS = {"train": 0, "benchmark": 1_000_003, "seed_images": 2_000_003}


def example(seed: int, index: int, skills=Q.SKILLS) -> dict:
  rng = np.random.default_rng([seed, index])
  skill = skills[index % len(skills)]
  scene, q = Q.scene_for_skill(skill, rng)
  return {"image": render(scene), "question": q.text, "answer": q.answer,
          "skill": q.skill, "facets": json.dumps(dict(q.facets), sort_keys=True),
          "scene": scene.to_json()}


def examples(split: str, start: int, stop: int, skills=Q.SKILLS):
  if split not in SPLIT_SEEDS:
    raise ValueError(f"unknown split {split!r}; splits are {sorted(SPLIT_SEEDS)}")
  for i in range(start, stop):
    yield example(SPLIT_SEEDS[split], i, skills)
