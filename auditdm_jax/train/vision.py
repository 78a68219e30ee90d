"""Dense pretraining of the vision tower on the scene world.

Every 16 px patch of a scene image is one grid cell, so each image token can
be supervised directly: linear heads on the tower's per-token output predict
the cell's colour, shape and size (or "empty"). This is the cheap part of a
VLM's visual pretraining (in the real PaliGemma it is SigLIP's contrastive
stage): a few hundred steps give per-cell accuracy near 100% and make the
later question-answering fine-tune much faster (docs/scene_world.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from auditdm_jax.models.siglip import SigLIP, SigLIPConfig
from auditdm_jax.train.tasks import NUM_CLASSES


def _heads_init(width: int):
  return {f"head{i}": jnp.zeros((width, n), jnp.float32) for i, n in enumerate(NUM_CLASSES)}


def pretrain_vision(vcfg: SigLIPConfig, img_params, batches: Iterator[dict], steps: int, *,
                    lr: float = 3e-3, warmup: int = 50, log_every: int = 100,
                    log=print) -> tuple[dict, dict]:
  """Trains `img_params` (SigLIP params, big_vision names) for `steps` batches
  of {"images" uint8 [B,H,W,3], "labels" int32 [B, cells, 3]}.
  Returns (img_params, {"accuracy": [colour, shape, size], "loss", "steps", "wall_s"})."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  module = SigLIP(vcfg)
  width = vcfg.out_dim or vcfg.width
  params = {"img": img_params, "heads": _heads_init(width)}
  warmup = min(warmup, steps // 2)
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                     lr * 0.1))
  opt_state = tx.init(params)

  def loss_fn(p, images, labels):
    feats = module.apply({"params": p["img"]}, images)          # [B, cells, D]
    loss, accs = 0.0, []
    for i in range(len(NUM_CLASSES)):
      logits = feats.astype(jnp.float32) @ p["heads"][f"head{i}"]
      loss += optax.softmax_cross_entropy_with_integer_labels(logits, labels[..., i]).mean()
      accs.append((logits.argmax(-1) == labels[..., i]).mean())
    return loss, jnp.stack(accs)

  @jax.jit
  def step(p, s, images, labels):
    (loss, accs), g = jax.value_and_grad(loss_fn, has_aux=True)(p, images, labels)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss, accs

  t0 = time.perf_counter()
  loss = accs = None
  for i in range(steps):
    batch = next(batches)
    params, opt_state, loss, accs = step(params, opt_state, batch["images"], batch["labels"])
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"vision pretraining: loss is {float(loss)} at step {i}")
    if log_every and (i % log_every == 0 or i == steps - 1):
      log(f"vision step {i + 1}/{steps}: loss {float(loss):.4f} cell accuracy "
          f"colour/shape/size {np.round(np.asarray(accs), 3).tolist()}")
  return params["img"], {"accuracy": np.asarray(accs).tolist(), "loss": float(loss),
                         "steps": steps, "wall_s": time.perf_counter() - t0}
