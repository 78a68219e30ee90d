"""`init` stage: materialise every model named in the config as a checkpoint.

For each entry of `config.models` it loads `checkpoint` (any format that
`auditdm_jax.models.load` reads; into the `preset` architecture when one is
given too) or, without one, initialises the `preset` randomly from the config
seed; writes it in our Orbax format to
`<workdir>/models/<name>`; reloads it through `load` and checks that the
reloaded model scores a probe batch identically. A model whose checkpoint
already exists in the workdir is reused (delete it to re-initialise).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import logging

from auditdm_jax import models, sharding
from auditdm_jax.models.ckpt.common import flatten
from auditdm_jax.pipeline.layout import model_dir, write_summary
from auditdm_jax.pipeline.spec import Stage

def build_model(spec, seed: int) -> models.VLM:
  """A VLM from one `config.models` entry (checkpoint path or preset)."""
  kw = {}
  if spec.get("dtype"):
    kw["dtype"] = spec.dtype
  if spec.get("param_dtype"):
    kw["param_dtype"] = spec.param_dtype
  if spec.get("checkpoint"):
    cfg = models.get_preset(spec.preset) if spec.get("preset") else None
    return models.load(spec.checkpoint, config=cfg, **kw)
  cfg = models.get_preset(spec.preset)
  if kw:
    cfg = cfg.with_dtypes(kw.get("dtype"), kw.get("param_dtype"))
  return models.VLM.random(cfg, seed=seed)


def _same(a: models.VLM, b: models.VLM) -> bool:
  """The reloaded model equals the saved one: architecture and every
  parameter, compared on the host (a 28B model never goes to one device)."""
  fa, fb = flatten(a.params), flatten(b.params)
  return a.config == b.config and fa.keys() == fb.keys() and all(
      np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype
      and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def run(config, workdir: str) -> dict:
  summary = {}
  for i, (name, spec) in enumerate(sorted(config.models.items())):
    path = model_dir(workdir, name)
    t0 = time.time()
    reused = os.path.exists(os.path.join(path, "auditdm_model.json"))
    if reused:
      model = models.load(path)
    else:
      model = build_model(spec, seed=int(config.seed) + i)
      model.save(path)
      if not _same(model, models.load(path)):
        raise RuntimeError(f"model {name}: the reloaded checkpoint at {path} differs "
                           "from the model that was saved")
    n = models.count_params(model.config)
    summary[name] = {"role": spec.role, "variant": model.config.variant,
                     "family": model.config.family, "params": n, "path": path,
                     "reused": reused}
    logging.info("init: %-14s %-9s %-16s %10d params  %s (%.1fs)", name, spec.role,
                 model.config.variant, n, "reused" if reused else "written",
                 time.time() - t0)
    print(f"init: {name:14s} role={spec.role:9s} {model.config.variant:16s} "
          f"{n:>12,d} params -> {path}{' (reused)' if reused else ''}", flush=True)
  if sharding.is_primary():
    write_summary(workdir, "init", json.dumps(summary, indent=2))
  return summary


STAGE = Stage(
    name="init", run=run, reads="config (`models`)",
    writes="`models/<name>/` (our Orbax format), `models.json`")
