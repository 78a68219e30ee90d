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
from auditdm_jax.scenes.world import GRID
from auditdm_jax.scenes.tasks import NUM_CLASSES


def head_classes(position_heads: bool, count_heads: bool = False) -> tuple[int, ...]:
  """Classes of the per-cell heads: colour, shape, size (0 = empty), with
  `position_heads` the cell's row and column, with `count_heads` how many
  objects of the scene share the cell's colour and its shape (0 = empty)."""
  cells = GRID * GRID
  return (NUM_CLASSES + ((GRID, GRID) if position_heads else ())
          + ((cells + 1, cells + 1) if count_heads else ()))


def count_labels(labels):
  """[B, cells, 3] (colour, shape, size; 0 = empty) -> int32 [B, cells, 2]:
  per occupied cell the number of objects with its colour and with its shape
  (itself included), 0 for an empty cell (traceable)."""
  out = []
  for j in (0, 1):
    a = labels[..., j]
    same = (a[:, :, None] == a[:, None, :]) & (a[:, None, :] > 0)
    out.append(jnp.where(a > 0, same.sum(-1), 0))
  return jnp.stack(out, -1).astype(jnp.int32)


def position_labels(num_cells: int) -> np.ndarray:
  """int32 [cells, 2]: (row, column) of every cell, row-major."""
  if num_cells != GRID * GRID:
    raise ValueError(f"position heads need {GRID * GRID} image tokens (one per grid cell), "
                     f"the tower has {num_cells}")
  idx = np.arange(num_cells)
  return np.stack([idx // GRID, idx % GRID], -1).astype(np.int32)


def _heads_init(width: int, classes: tuple[int, ...]):
  return {f"head{i}": jnp.zeros((width, n), jnp.float32) for i, n in enumerate(classes)}


def pretrain_vision(vcfg: SigLIPConfig, img_params, batches: Iterator[dict], steps: int, *,
                    lr: float = 3e-3, warmup: int = 50, log_every: int = 100,
                    position_heads: bool = False, count_heads: bool = False,
                    log=print) -> tuple[dict, dict]:
  """Trains `img_params` (SigLIP params, big_vision names) for `steps` batches
  of {"images" uint8 [B,H,W,3], "labels" int32 [B, cells, 3]}.

  With `position_heads`, two more linear heads predict each cell's row and
  column from its token: the fixed position embedding alone is washed out by
  the content heads (row / column only ~0.9 linearly decodable), and spatial
  questions need position in the token the LLM retrieves. With `count_heads`,
  two heads predict how many objects share the cell's colour and its shape
  (so "how many red objects?" can be read from any red cell's token).
  Returns (img_params, {"accuracy": [colour, shape, size(, row, column)
  (, colour count, shape count)],
  "loss", "steps", "wall_s"})."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  module = SigLIP(vcfg)
  width = vcfg.out_dim or vcfg.width
  classes = head_classes(position_heads, count_heads)
  pos = jnp.asarray(position_labels(vcfg.num_patches)) if position_heads else None
  params = {"img": img_params, "heads": _heads_init(width, classes)}
  warmup = min(warmup, steps // 2)
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                     lr * 0.1))
  opt_state = tx.init(params)

  def loss_fn(p, images, labels):
    feats = module.apply({"params": p["img"]}, images)          # [B, cells, D]
    counts = count_labels(labels) if count_heads else None
    if pos is not None:
      labels = jnp.concatenate(
          [labels, jnp.broadcast_to(pos, labels.shape[:2] + pos.shape[-1:])], -1)
    if counts is not None:
      labels = jnp.concatenate([labels, counts], -1)
    loss, accs = 0.0, []
    for i in range(len(classes)):
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
      names = ("colour/shape/size" + ("/row/column" if position_heads else "")
               + ("/colour count/shape count" if count_heads else ""))
      log(f"vision step {i + 1}/{steps}: loss {float(loss):.4f} cell accuracy {names} "
          f"[{', '.join(f'{a:.3f}' for a in np.asarray(accs))}]")
  return params["img"], {"accuracy": np.asarray(accs).tolist(), "loss": float(loss),
                         "steps": steps, "wall_s": time.perf_counter() - t0}
