"""Supervised fine-tuning (SFT) of PaliGemma 2 / Gemma 3 VLMs.

    params, summary = train(cfg, params, data_iter, TrainConfig(steps=1000), workdir)

Data: any iterator of dict batches of numpy arrays (a Grain `DatasetIterator`
or `DataLoaderIterator` for exact resumption), one batch per optimizer step:
  images      uint8 [B, S, S, 3] at the model's resolution;
  tokens      int   [B, T] text tokens (Gemma 3: the prompt's <start_of_image>
              already expanded into the image block, `sft_example` does it);
  input_mask  bool  [B, T] real (non-pad) tokens;
  mask_ar     int   [B, T] 1 on the answer (suffix) tokens, 0 on the prompt;
  loss_mask   bool  [B, T] optional; which tokens the loss covers (default
              input_mask & mask_ar: the answer tokens);
  phrases     int   [B, P, 3] with TrainConfig.phrase_aux > 0 (PaliGemma):
              (text position of a referring phrase's last token, its object's
              row, column), -1 rows unused (`tasks.phrase_labels`).
Other keys are ignored. `sft_example` / `sft_batch` build these from token ids.

The loss is the mean negative log-likelihood over all loss tokens of the batch
(token-weighted, not a mean of per-row means). With `phrase_aux` > 0 a
grounding term is added: linear heads on the final hidden state at each
phrase's last token predict its object's row and column (softmax
cross-entropy, summed over the two heads, mean over the batch's phrases,
times phrase_aux). The heads live in the training state as
params["phrase_heads"] and are not part of the returned model. A step splits the batch into
`grad_accum` microbatches inside one jitted function (`lax.scan`), sums the
per-token gradients and divides by the batch's token count, so accumulation
changes memory, not the update. Parameters and the optimizer state are
sharded over the mesh by the repo's partition rules (`auditdm_jax.sharding`),
batches over data x fsdp; the step has explicit in/out shardings and donates
the training state.

Resumption: `workdir/ckpt` (see `ckpt.py`) holds params, optimizer state, the
data iterator's position, the RNG key and the step; `train` continues from
the latest checkpoint when one exists, and a run killed at any point and
restarted ends with exactly the parameters of an uninterrupted run (on the
same devices). A non-finite loss or gradient norm raises `NonFiniteLossError`
before anything is saved; the update of that step is not applied.

`Trainer` exposes the pieces (`init_state`, `step`, `abstract_state`) for
callers that drive steps themselves. Compiled steps are cached per model,
step-relevant config, mesh and batch shapes, so repeated runs compile once.
Single-process only: batches are placed with `jax.device_put` from the full
host batch (multi-host input would need make_array_from_process_local_data).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from auditdm_jax import sharding
from auditdm_jax.models import logical, vlm
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.handle import check_images, check_rows, prompt_heads
from auditdm_jax.train import ckpt as ckpt_lib
from auditdm_jax.train import preemption
from auditdm_jax.train.metrics import MetricsWriter
from auditdm_jax.train.optim import make_optimizer, opt_state_shardings
from auditdm_jax.utils.fileio import atomic_write_text

BATCH_KEYS = ("images", "tokens", "input_mask", "mask_ar")
SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_MESH = (("data", 1), ("fsdp", -1), ("model", 1))


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm of a step was NaN or infinite."""


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _regexes(name: str, value, problems: list[str]) -> tuple[str, ...]:
  if isinstance(value, str):
    problems.append(f"{name} must be a tuple of regexes, got the string {value!r} "
                    f"(write ({value!r},))")
    return (value,)
  out = tuple(value)
  for p in out:
    try:
      re.compile(p)
    except (re.error, TypeError) as e:
      problems.append(f"{name}: bad regex {p!r}: {e}")
  return out


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, checkpointing and logging of one fine-tuning run."""

  steps: int = 1000                   # optimizer steps (one data batch each)
  lr: float = 1e-5                    # peak learning rate
  warmup_steps: int | float = 0       # int: steps; float in [0, 1]: fraction of steps
  end_lr: float = 0.0                 # learning rate reached at `steps`
  schedule: str = "cosine"            # decay after warm-up: cosine | linear | constant
  weight_decay: float = 0.0           # decoupled (AdamW), multiplied by the lr
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float | None = 1.0       # global-norm clip; None or 0: off
  grad_accum: int = 1                 # microbatches per step (must divide the batch)
  frozen: tuple[str, ...] = ()        # regexes over '/'-joined param paths, e.g. r"^img/"
  no_decay: tuple[str, ...] = ()      # regexes of params without weight decay
  checkpoint_every: int = 500
  keep_checkpoints: int | None = 2    # None: keep all
  log_every: int = 10
  eval_every: int = 0                 # 0: evaluate (if eval_fn) at the end only
  seed: int = 0
  mesh: tuple[tuple[str, int], ...] = DEFAULT_MESH   # or a {name: size} dict
  rules: tuple | None = None          # partition rules; None: sharding.DEFAULT_RULES
  activation_rules: tuple | None = None   # logical activation rules; None: defaults
  fsdp_min_size: int = sharding.FSDP_MIN_SIZE
  compiler_options: tuple = ()        # XLA options for the step, {name: value} or pairs
  progress: bool | None = None        # tqdm bar; None: when stdout is a tty
  tensorboard: bool = True
  export_final: bool = False          # also save the final model to workdir/final
  phrase_aux: float = 0.0             # weight of the phrase grounding loss (0: off)
  phrase_classes: int = 3             # classes of its row and column heads

  def __post_init__(self):
    problems: list[str] = []
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if not _is_int(self.steps) or self.steps < 1:
      problems.append(f"steps must be an int >= 1, got {self.steps!r}")
    for name in ("lr",):
      v = getattr(self, name)
      if not _is_num(v) or not math.isfinite(v) or v <= 0:
        problems.append(f"{name} must be a finite number > 0, got {v!r}")
    if not _is_num(self.end_lr) or not math.isfinite(self.end_lr) or self.end_lr < 0:
      problems.append(f"end_lr must be a finite number >= 0, got {self.end_lr!r}")
    elif _is_num(self.lr) and self.end_lr > self.lr:
      problems.append(f"end_lr ({self.end_lr}) must not exceed lr ({self.lr})")
    w = self.warmup_steps
    if _is_int(w):
      if w < 0 or (_is_int(self.steps) and w > self.steps):
        problems.append(f"warmup_steps must be in [0, steps={self.steps}], got {w!r}")
    elif isinstance(w, (float, np.floating)):
      if not 0.0 <= w <= 1.0:
        problems.append(f"warmup_steps as a float is a fraction of steps and must be "
                        f"in [0, 1], got {w!r}")
    else:
      problems.append(f"warmup_steps must be an int or a float fraction, got {w!r}")
    if self.schedule not in SCHEDULES:
      problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if not _is_num(self.weight_decay) or not self.weight_decay >= 0:
      problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
    for name in ("b1", "b2"):
      v = getattr(self, name)
      if not _is_num(v) or not 0.0 <= v < 1.0:
        problems.append(f"{name} must be in [0, 1), got {v!r}")
    if not _is_num(self.eps) or not self.eps > 0:
      problems.append(f"eps must be > 0, got {self.eps!r}")
    if self.grad_clip is not None and (not _is_num(self.grad_clip)
                                       or not self.grad_clip >= 0):
      problems.append(f"grad_clip must be None or a number >= 0, got {self.grad_clip!r}")
    for name in ("grad_accum", "checkpoint_every", "log_every"):
      v = getattr(self, name)
      if not _is_int(v) or v < 1:
        problems.append(f"{name} must be an int >= 1, got {v!r}")
    if not _is_int(self.eval_every) or self.eval_every < 0:
      problems.append(f"eval_every must be an int >= 0, got {self.eval_every!r}")
    if self.keep_checkpoints is not None and (not _is_int(self.keep_checkpoints)
                                              or self.keep_checkpoints < 1):
      problems.append(f"keep_checkpoints must be None or an int >= 1, "
                      f"got {self.keep_checkpoints!r}")
    if not _is_int(self.seed):
      problems.append(f"seed must be an int, got {self.seed!r}")
    if not _is_int(self.fsdp_min_size) or self.fsdp_min_size < 0:
      problems.append(f"fsdp_min_size must be an int >= 0, got {self.fsdp_min_size!r}")
    opts = self.compiler_options
    opts = list(opts.items()) if isinstance(opts, Mapping) else list(opts or ())
    if any(not isinstance(o, (tuple, list)) or len(o) != 2 or not isinstance(o[0], str)
           or not isinstance(o[1], (bool, int, float, str)) for o in opts):
      problems.append(f"compiler_options must map option names to bool/int/float/str "
                      f"values, got {self.compiler_options!r}")
    else:
      set_("compiler_options", tuple(sorted((k, v) for k, v in opts)))
    set_("frozen", _regexes("frozen", self.frozen, problems))
    set_("no_decay", _regexes("no_decay", self.no_decay, problems))
    mesh = self.mesh
    items = list(mesh.items()) if isinstance(mesh, Mapping) else list(mesh or ())
    if (not items or any(not isinstance(i, (tuple, list)) or len(i) != 2 for i in items)
        or any(not isinstance(n, str) or not _is_int(s) or (s < 1 and s != -1)
               for n, s in items)):
      problems.append(f"mesh must map axis names to sizes >= 1 (one may be -1), "
                      f"got {mesh!r}")
    else:
      names = [n for n, _ in items]
      if len(set(names)) != len(names) or sum(s == -1 for _, s in items) > 1:
        problems.append(f"mesh axes must be unique with at most one -1, got {mesh!r}")
      set_("mesh", tuple((n, int(s)) for n, s in items))
    if self.rules is not None:
      try:
        set_("rules", sharding.rules_from_config(self.rules))
      except ValueError as e:
        problems.append(f"rules: {e}")
    if self.activation_rules is not None:
      ar = self.activation_rules
      items = list(ar.items()) if isinstance(ar, Mapping) else list(ar)
      set_("activation_rules", tuple(
          (k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in items))
    if not _is_num(self.phrase_aux) or not math.isfinite(self.phrase_aux) \
        or self.phrase_aux < 0:
      problems.append(f"phrase_aux must be a finite number >= 0, got {self.phrase_aux!r}")
    if not _is_int(self.phrase_classes) or self.phrase_classes < 2:
      problems.append(f"phrase_classes must be an int >= 2, got {self.phrase_classes!r}")
    if self.progress is not None and not isinstance(self.progress, bool):
      problems.append(f"progress must be None or a bool, got {self.progress!r}")
    if problems:
      raise ValueError("invalid TrainConfig: " + "; ".join(problems))

  @property
  def warmup(self) -> int:
    """Warm-up length in steps."""
    if isinstance(self.warmup_steps, (float, np.floating)):
      return round(self.warmup_steps * self.steps)
    return int(self.warmup_steps)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------


def sft_example(cfg: VLMConfig, image, prompt: Sequence[int], answer: Sequence[int],
                seq_len: int) -> dict[str, np.ndarray]:
  """One training row (no batch axis) padded to seq_len text tokens.

  PaliGemma: prompt = the text after the image tokens (BOS ... "\\n"); Gemma 3:
  the prompt holds one <start_of_image>, expanded here. The answer should end
  with EOS (or <end_of_turn>) for the model to learn to stop.
  """
  prompt = check_rows(cfg, [prompt], "prompt", allow_empty=cfg.family == "paligemma")[0]
  answer = check_rows(cfg, [answer], "answer", allow_empty=False)[0]
  head = prompt_heads(cfg, [prompt])[0]
  seq = head + answer
  if len(seq) > seq_len:
    raise ValueError(f"prompt + answer hold {len(seq)} tokens (after image expansion), "
                     f"more than seq_len={seq_len}")
  image = check_images(cfg, np.asarray(image)[None], 1)[0]
  tokens = np.zeros((seq_len,), np.int32)
  tokens[:len(seq)] = seq
  input_mask = np.arange(seq_len) < len(seq)
  mask_ar = ((np.arange(seq_len) >= len(head)) & input_mask).astype(np.int32)
  return {"images": image, "tokens": tokens, "input_mask": input_mask, "mask_ar": mask_ar}


def sft_batch(cfg: VLMConfig, images, prompts, answers, seq_len: int
              ) -> dict[str, np.ndarray]:
  """`sft_example` rows stacked into one batch."""
  if not len(images) == len(prompts) == len(answers):
    raise ValueError(f"got {len(images)} images, {len(prompts)} prompts and "
                     f"{len(answers)} answers")
  rows = [sft_example(cfg, i, p, a, seq_len) for i, p, a in zip(images, prompts, answers)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def check_batch(cfg: VLMConfig, batch, grad_accum: int = 1) -> dict[str, np.ndarray]:
  """The model inputs of one data batch as numpy arrays, validated."""
  if not isinstance(batch, Mapping):
    raise TypeError(f"a training batch must be a dict of arrays, got {type(batch).__name__}")
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"training batch lacks {missing}; it has {sorted(batch)} "
                     f"(needed: {list(BATCH_KEYS)}, optional 'loss_mask')")
  tokens = np.asarray(batch["tokens"])
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"batch['tokens'] must be an int [B, T] array, got "
                     f"{tokens.dtype} {tokens.shape}")
  b, t = tokens.shape
  images = check_images(cfg, batch["images"], b)
  out = {"images": images, "tokens": tokens.astype(np.int32)}
  for k, dtype in (("input_mask", np.bool_), ("mask_ar", np.int32), ("loss_mask", np.bool_)):
    if k not in batch:
      continue
    a = np.asarray(batch[k])
    if a.shape != (b, t):
      raise ValueError(f"batch[{k!r}] has shape {a.shape}, tokens have {(b, t)}")
    out[k] = a.astype(dtype)
  if "phrases" in batch:
    ph = np.asarray(batch["phrases"])
    if ph.ndim != 3 or ph.shape[0] != b or ph.shape[2] != 3 \
        or not np.issubdtype(ph.dtype, np.integer):
      raise ValueError(f"batch['phrases'] must be an int [B={b}, P, 3] array of (position, "
                       f"row, column), got {ph.dtype} {ph.shape}")
    if ph[..., 0].max(initial=-1) >= t:
      raise ValueError(f"batch['phrases'] holds a position >= the {t} text tokens")
    out["phrases"] = ph.astype(np.int32)
  allowed = out["tokens"][out["input_mask"]]
  if cfg.image_token_id is not None:
    allowed = allowed[allowed != cfg.image_token_id]
  if allowed.size and (allowed.min() < 0 or allowed.max() >= cfg.text.vocab_size):
    raise ValueError(f"batch['tokens'] holds ids outside [0, {cfg.text.vocab_size})")
  if b % grad_accum:
    raise ValueError(f"batch size {b} is not divisible by TrainConfig.grad_accum="
                     f"{grad_accum}")
  return out


# ----------------------------------------------------------------------------
# Loss.
# ----------------------------------------------------------------------------


def aligned_logits(cfg: VLMConfig, params, batch, rng=None, return_hidden: bool = False):
  """(logits float32 [B, T', V], target ids [B, T']) where logits[:, t]
  predicts target[:, t]. PaliGemma: T' = T (the last image token predicts the
  first text token); Gemma 3: T' = T - 1 (text token t predicts t + 1).
  With return_hidden, also the final hidden states [B, S, D] of the whole
  sequence (PaliGemma: image tokens first), from the same forward pass."""
  module = vlm.build(cfg)
  rngs = None if rng is None else {"dropout": rng}
  tokens = batch["tokens"]
  paligemma = cfg.family == "paligemma"
  args = (batch["images"], tokens, batch["input_mask"]) + ((batch["mask_ar"],) if paligemma
                                                            else ())
  hidden = None
  if return_hidden:
    hidden = module.apply({"params": params}, *args, return_hidden=True, rngs=rngs)
    logits = module.apply({"params": params}, hidden, method=lambda m, h: m.llm.logits(h))
  else:
    logits = module.apply({"params": params}, *args, rngs=rngs)
  if paligemma:
    n_img = cfg.num_image_tokens
    pred, target = logits[:, n_img - 1:-1], tokens               # [B, T, V], [B, T]
  else:
    pred, target = logits[:, :-1], tokens[:, 1:]                 # [B, T-1, V]
  # Gemma 3 image placeholders lie outside the table; they are never loss
  # tokens, but must not gather out of range (that yields NaN, and 0 * NaN).
  out = pred.astype(jnp.float32), jnp.clip(target, 0, pred.shape[-1] - 1)
  return out + (hidden,) if return_hidden else out


PHRASE_HEADS = "phrase_heads"       # params key of the grounding heads (training only)


def phrase_sums(cfg: VLMConfig, params, batch, rng=None):
  """(summed NLL, correct count, loss-token count, summed phrase CE, phrase
  count): `batch_sums` plus the grounding term of `TrainConfig.phrase_aux`,
  from one forward pass. params holds params[PHRASE_HEADS] = {"row", "col"}
  [D, C] heads; batch["phrases"] [B, P, 3] (text position, row, column)."""
  if cfg.family != "paligemma":
    raise ValueError("the phrase grounding loss is defined for PaliGemma models, "
                     f"not {cfg.family!r}")
  heads = params[PHRASE_HEADS]
  model_p = {k: v for k, v in params.items() if k != PHRASE_HEADS}
  pred, target, hidden = aligned_logits(cfg, model_p, batch, rng, return_hidden=True)
  nll, correct, n = _sums(batch, *_stats(cfg, pred, target))
  ph = batch["phrases"]
  valid = ph[..., 0] >= 0
  pos = cfg.num_image_tokens + jnp.maximum(ph[..., 0], 0)
  at = jnp.take_along_axis(hidden, pos[..., None], axis=1).astype(jnp.float32)   # [B, P, D]
  ce = 0.0
  for j, name in enumerate(("row", "col")):
    z = at @ heads[name].astype(jnp.float32)                                     # [B, P, C]
    ce = ce + optax.softmax_cross_entropy_with_integer_labels(z, jnp.maximum(ph[..., 1 + j], 0))
  return (nll, correct, n, jnp.sum(jnp.where(valid, ce, 0.0)),
          jnp.sum(valid).astype(jnp.float32))


def phrase_head_params(cfg: VLMConfig, classes: int, abstract: bool = False) -> dict:
  """Zero-initialised {"row", "col"} [D, classes] grounding heads."""
  shape = (cfg.text.width, int(classes))
  make = (lambda: jax.ShapeDtypeStruct(shape, jnp.float32)) if abstract else \
      (lambda: np.zeros(shape, np.float32))
  return {"row": make(), "col": make()}


def pad_to_tokens(cfg: VLMConfig, x):
  """[B, T'] per-prediction values -> [B, T] aligned with the tokens they
  predict (Gemma 3: a leading 0 / False, as nothing predicts token 0)."""
  if cfg.family == "paligemma":
    return x
  return jnp.pad(x, ((0, 0), (1, 0)))


def _stats(cfg: VLMConfig, pred, target):
  """Aligned logits -> (log p(target), argmax == target), both [B, T]."""
  lsm = jax.nn.log_softmax(pred, axis=-1)
  lp = jnp.take_along_axis(lsm, target[..., None], axis=-1)[..., 0]
  correct = jnp.argmax(pred, axis=-1) == target
  return pad_to_tokens(cfg, lp), pad_to_tokens(cfg, correct)


def token_stats(cfg: VLMConfig, params, batch, rng=None):
  """(log p(token | image, earlier tokens), argmax == token), both [B, T]
  over the text tokens (traceable; as `handle.token_logprobs`, 0 / False
  where nothing precedes)."""
  return _stats(cfg, *aligned_logits(cfg, params, batch, rng))


def loss_mask(batch):
  """[B, T] bool: the tokens the loss covers (answer tokens by default)."""
  mask = batch["input_mask"].astype(jnp.bool_)
  if "loss_mask" in batch:
    return mask & batch["loss_mask"].astype(jnp.bool_)
  return mask & (batch["mask_ar"] != 0)


def _sums(batch, lp, correct):
  mask = loss_mask(batch)
  nll = -jnp.sum(jnp.where(mask, lp, 0.0))
  return nll, jnp.sum(correct & mask).astype(jnp.float32), jnp.sum(mask).astype(jnp.float32)


def batch_sums(cfg: VLMConfig, params, batch, rng=None):
  """(summed NLL, correct argmax count, loss-token count) over the batch."""
  return _sums(batch, *token_stats(cfg, params, batch, rng))


def loss_fn(cfg: VLMConfig, params, batch, rng=None):
  """(mean NLL over the batch's loss tokens, {"accuracy", "tokens"})."""
  nll, correct, n = batch_sums(cfg, params, batch, rng)
  d = jnp.maximum(n, 1.0)
  return nll / d, {"accuracy": correct / d, "tokens": n}


# ----------------------------------------------------------------------------
# The jitted step.
# ----------------------------------------------------------------------------


def split_microbatches(x, n: int):
  """[B, ...] -> [n, B/n, ...]; microbatch a holds rows a, a+n, a+2n, ... so
  that with the batch sharded in contiguous blocks each device keeps its own
  rows (no data movement)."""
  b = x.shape[0]
  return x.reshape((b // n, n) + x.shape[1:]).swapaxes(0, 1)


class StepParts(NamedTuple):
  """What every jitted training step (SFT, GRPO) builds the same way."""
  split: Callable      # params -> (trainable {path: leaf}, frozen {path: leaf})
  merge: Callable      # (trainable, frozen) -> params tree
  act_rules: dict | None
  param_sh: dict       # {path: NamedSharding} of the params
  micro_sh: dict       # batch key -> sharding of its [A, B/A, ...] microbatches


def step_parts(tcfg: TrainConfig, mask, mesh: Mesh, state_shardings, batch_shardings
               ) -> StepParts:
  mask_flat = flax.traverse_util.flatten_dict(mask, sep="/")

  def split(params):
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return ({k: v for k, v in flat.items() if mask_flat[k]},
            {k: v for k, v in flat.items() if not mask_flat[k]})

  def merge(train_p, frozen_p):
    return flax.traverse_util.unflatten_dict({**train_p, **frozen_p}, sep="/")

  return StepParts(
      split, merge, None if tcfg.activation_rules is None else dict(tcfg.activation_rules),
      flax.traverse_util.flatten_dict(state_shardings["params"], sep="/"),
      {k: NamedSharding(mesh, PartitionSpec(None, *s.spec)) for k, s in batch_shardings.items()})


def guarded_update(tx, parts: StepParts, state, g, train_p, frozen_p, loss):
  """Applies gradients g {path: leaf} of the trainable params unless the loss
  or the gradient norm is non-finite (then params and optimizer state stay).
  Returns (new state, grad_norm, finite)."""
  grad_norm = optax.global_norm(g)
  grads = parts.merge(g, {k: jnp.zeros_like(v) for k, v in frozen_p.items()})
  updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
  upd_flat = flax.traverse_util.flatten_dict(updates, sep="/")
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jnp.where(finite, new, old)
  new_train = {k: keep(optax.apply_updates(p, upd_flat[k]), p) for k, p in train_p.items()}
  new_state = {"params": parts.merge(new_train, frozen_p),
               "opt_state": jax.tree.map(keep, new_opt, state["opt_state"]),
               "rng": state["rng"], "step": state["step"] + 1}
  return new_state, grad_norm, finite


def make_train_step(cfg: VLMConfig, tcfg: TrainConfig, tx, mask, mesh: Mesh,
                    state_shardings, batch_shardings):
  """The jitted (state, batch) -> (state, metrics) step (state donated)."""
  accum = tcfg.grad_accum
  parts = step_parts(tcfg, mask, mesh, state_shardings, batch_shardings)
  split, merge = parts.split, parts.merge
  act_rules, param_sh, micro_sh = parts.act_rules, parts.param_sh, parts.micro_sh

  def step_fn(state, batch):
    with logical.activation_sharding(mesh, act_rules):
      params = state["params"]
      train_p, frozen_p = split(params)
      key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
      micro = {k: jax.lax.with_sharding_constraint(split_microbatches(v, accum), micro_sh[k])
               for k, v in batch.items()}                          # [A, B/A, ...]
      aux_w = float(tcfg.phrase_aux)
      if aux_w:
        # The grounding term is a mean over the whole batch's phrases; the sums
        # below are divided by its token count, so each microbatch's phrase CE
        # is scaled by tokens / phrases (both known from the batch up front).
        n_all = jnp.maximum(jnp.sum(loss_mask(batch)).astype(jnp.float32), 1.0)
        m_all = jnp.maximum(jnp.sum(batch["phrases"][..., 0] >= 0).astype(jnp.float32), 1.0)

      def sums(tp, mb, k):
        p = merge(tp, frozen_p)
        if aux_w:
          nll, correct, n, ce, _ = phrase_sums(cfg, p, mb, k)
          return nll + aux_w * ce * (n_all / m_all), (nll, correct, n, ce)
        nll, correct, n = batch_sums(cfg, p, mb, k)
        return nll, (nll, correct, n, jnp.zeros((), jnp.float32))

      grad_fn = jax.value_and_grad(sums, has_aux=True)

      def body(carry, xs):
        g_acc, obj_acc, nll_acc, c_acc, n_acc, ce_acc = carry
        mb, i = xs
        (obj, (nll, c, n, ce)), g = grad_fn(train_p, mb, jax.random.fold_in(key, i))
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, obj_acc + obj, nll_acc + nll, c_acc + c, n_acc + n, ce_acc + ce), None

      g0 = {k: jax.lax.with_sharding_constraint(jnp.zeros(v.shape, jnp.float32), param_sh[k])
            for k, v in train_p.items()}
      zero = jnp.zeros((), jnp.float32)
      (g, obj, nll, correct, n, ce), _ = jax.lax.scan(
          body, (g0, zero, zero, zero, zero, zero), (micro, jnp.arange(accum)))
      denom = jnp.maximum(n, 1.0)
      g = {k: (v / denom).astype(train_p[k].dtype) for k, v in g.items()}
      loss = nll / denom
      new_state, grad_norm, finite = guarded_update(tx, parts, state, g, train_p, frozen_p,
                                                    obj / denom)
      metrics = {"loss": loss, "accuracy": correct / denom, "answer_tokens": n,
                 "text_tokens": jnp.sum(batch["input_mask"]).astype(jnp.float32),
                 "grad_norm": grad_norm, "finite": finite}
      if aux_w:
        metrics["phrase_loss"] = ce / m_all
      return new_state, metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


# ----------------------------------------------------------------------------
# The trainer: sharded state and the compiled step.
# ----------------------------------------------------------------------------

# Compiled steps (and optimizer inits) by (model, HLO-relevant TrainConfig, mesh,
# batch signature): repeated `train` calls (rounds of fine-tuning, tests) reuse them.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_MAX = 16


def _cached(key, build: Callable[[], Any]):
  if key in _COMPILED:
    _COMPILED.move_to_end(key)
    return _COMPILED[key]
  _COMPILED[key] = build()
  while len(_COMPILED) > _COMPILED_MAX:
    _COMPILED.popitem(last=False)
  return _COMPILED[key]


def _step_key_config(tcfg: TrainConfig) -> TrainConfig:
  """tcfg with the fields that do not enter the compiled step normalised."""
  return dataclasses.replace(tcfg, seed=0, checkpoint_every=1, keep_checkpoints=None,
                             log_every=1, eval_every=0, progress=None, tensorboard=False,
                             export_final=False, mesh=DEFAULT_MESH)


def _check_params(params, abstract) -> None:
  got = {k: tuple(np.shape(v)) for k, v in
         flax.traverse_util.flatten_dict(params, sep="/").items()}
  want = {k: tuple(v.shape) for k, v in
          flax.traverse_util.flatten_dict(abstract, sep="/").items()}
  if got != want:
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    shapes = [f"{k}: {got[k]} vs {want[k]}" for k in sorted(set(got) & set(want))
              if got[k] != want[k]][:5]
    raise ValueError(f"params do not fit the model config: missing {missing}, "
                     f"unexpected {extra}, shape mismatches {shapes}")


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


class Trainer:
  """The sharded training state of one model and its compiled step.

  state = {"params", "opt_state", "rng" (uint32 key data), "step" (int32)},
  every leaf placed by `state_shardings`.
  """

  def __init__(self, cfg: VLMConfig, tcfg: TrainConfig, mesh: Mesh | None = None):
    self.cfg, self.tcfg = cfg, tcfg
    self.mesh = mesh if mesh is not None else sharding.make_mesh(dict(tcfg.mesh))
    rules = tcfg.rules if tcfg.rules is not None else sharding.DEFAULT_RULES
    self.abstract_params = vlm.abstract_params(cfg)
    if tcfg.phrase_aux:
      self.abstract_params = dict(self.abstract_params, **{
          PHRASE_HEADS: phrase_head_params(cfg, tcfg.phrase_classes, abstract=True)})
    self.param_shardings = sharding.param_shardings(self.abstract_params, self.mesh, rules,
                                                    tcfg.fsdp_min_size)
    self.tx, self.mask, self.schedule = make_optimizer(tcfg, self.abstract_params)
    self.abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
    self.opt_shardings = opt_state_shardings(self.abstract_opt, self.abstract_params,
                                             self.param_shardings, self.mesh)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.state_shardings = {"params": self.param_shardings, "opt_state": self.opt_shardings,
                            "rng": self.replicated, "step": self.replicated}
    _, self.opt_paths = ckpt_lib.flatten_opt_state(self.abstract_opt)
    self.compile_s = 0.0

  def abstract_state(self) -> dict:
    """ShapeDtypeStructs (with shardings) of the state: Orbax restore targets."""
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return {"params": _with_shardings(self.abstract_params, self.param_shardings),
            "opt_state": _with_shardings(self.abstract_opt, self.opt_shardings),
            "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=self.replicated),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)}

  def init_state(self, params) -> dict:
    """Step-0 state from `params` (copied: the step donates its state); with
    phrase_aux, zero grounding heads are added unless params hold them."""
    if self.tcfg.phrase_aux and PHRASE_HEADS not in params:
      params = dict(params, **{PHRASE_HEADS: phrase_head_params(self.cfg,
                                                                 self.tcfg.phrase_classes)})
    _check_params(params, self.abstract_params)
    # Fresh copies: device_put may reuse the input's buffer for a shard even
    # with may_alias=False (seen on CPU: a device-0 array put replicated), and
    # the donated state must not share a buffer with any other array made from
    # the same params (e.g. the GRPO KL reference, which it would delete).
    params = jax.tree.map(
        lambda x, a, s: jax.device_put(
            jnp.array(x, dtype=a.dtype, copy=True) if isinstance(x, jax.Array)
            else np.array(x, a.dtype, copy=True), s, may_alias=False),
        params, self.abstract_params, self.param_shardings)
    key = ("init", self.cfg, _step_key_config(self.tcfg), self.mesh)
    opt_init = _cached(key, lambda: jax.jit(self.tx.init, out_shardings=self.opt_shardings)
                       .lower(params).compile(self._compiler_options()))
    opt_state = opt_init(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(self.tcfg.seed)), self.replicated)
    return {"params": params, "opt_state": opt_state, "rng": rng,
            "step": jax.device_put(jnp.int32(0), self.replicated)}

  def batch_shardings(self, batch: Mapping[str, np.ndarray]) -> dict[str, NamedSharding]:
    """Batch rows over data x fsdp when each microbatch divides evenly (`batch`
    is this process's share of the global batch)."""
    rows = next(iter(batch.values())).shape[0] * jax.process_count()   # global rows
    micro = rows // self.tcfg.grad_accum
    return {k: NamedSharding(self.mesh, sharding.batch_spec(micro, self.mesh, np.ndim(v)))
            for k, v in batch.items()}

  def _compiler_options(self) -> dict[str, Any] | None:
    return dict(self.tcfg.compiler_options) or None

  def compiled_step(self, state, dev_batch):
    """The step compiled for this batch signature (cached across Trainers)."""
    sig = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(dev_batch.items()))
    key = ("step", type(self).__name__, self.cfg, self.step_key(), self.mesh, sig)

    def build():
      t0 = time.perf_counter()
      batch_sh = {k: v.sharding for k, v in dev_batch.items()}
      fn = self.make_step(batch_sh)
      out = fn.lower(state, dev_batch).compile(self._compiler_options())
      self.compile_s += time.perf_counter() - t0
      return out

    return _cached(key, build)

  # Subclasses with another loss (the GRPO trainer) override these three.
  def step_key(self):
    """What, besides the model, mesh and batch signature, shapes the step."""
    return _step_key_config(self.tcfg)

  def make_step(self, batch_shardings):
    """The jitted (state, batch) -> (state, metrics) function."""
    return make_train_step(self.cfg, self.tcfg, self.tx, self.mask, self.mesh,
                           self.state_shardings, batch_shardings)

  def check(self, batch) -> dict[str, np.ndarray]:
    return check_batch(self.cfg, batch, self.tcfg.grad_accum)

  def step(self, state, batch) -> tuple[dict, dict[str, np.ndarray]]:
    """One optimizer step on a host batch; `state` is donated (invalid after).
    Returns the new state and the step's metrics (numpy scalars)."""
    batch = self.check(batch)
    if self.tcfg.phrase_aux and "phrases" not in batch:
      raise ValueError("TrainConfig.phrase_aux > 0 needs batch['phrases'] [B, P, 3] "
                       "(tasks.VQATask(..., phrases=True) makes them)")
    if not self.tcfg.phrase_aux:
      batch.pop("phrases", None)
    dev_batch = sharding.put_batch(batch, self.batch_shardings(batch))
    new_state, metrics = self.compiled_step(state, dev_batch)(state, dev_batch)
    return new_state, jax.device_get(metrics)


# ----------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------


def _progress_bar(tcfg: TrainConfig, start: int):
  enabled = sys.stdout.isatty() if tcfg.progress is None else tcfg.progress
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=tcfg.steps, initial=start, desc="train", dynamic_ncols=True)


def train(cfg: VLMConfig, params, data_iter, tcfg: TrainConfig, workdir: str, *,
          mesh: Mesh | None = None,
          eval_fn: Callable[[Any, int], Mapping[str, float]] | None = None,
          tokenizer=None) -> tuple[Any, dict[str, Any]]:
  """Fine-tunes `params` for tcfg.steps steps; returns (params, summary).

  Resumes from the latest checkpoint in workdir/ckpt when there is one (then
  `params` is ignored and may be None). `mesh` overrides tcfg.mesh (e.g. a
  mesh over a subset of the devices). `eval_fn(params, step) -> {name: value}`
  runs every tcfg.eval_every steps and at the end; its values are logged as
  "eval/<name>". With tcfg.export_final the final model (and `tokenizer`, if
  given) is saved to workdir/final in the repo's native format. Metrics go to
  stdout, workdir/metrics.jsonl and workdir/tb; the summary also to
  workdir/summary.json.
  """
  t_begin = time.perf_counter()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(cfg, tcfg, mesh)
  checkpointer = ckpt_lib.TrainCheckpointer(os.path.join(workdir, "ckpt"),
                                            tcfg.keep_checkpoints, data_iter)
  if checkpointer.mode == ckpt_lib.DATA_NONE:
    warnings.warn(f"the data iterator ({type(data_iter).__name__}) has no get_state/"
                  "set_state: its position is not checkpointed, and a resumed run "
                  "restarts it from the beginning; use a Grain iterator", stacklevel=2)
  latest = checkpointer.latest_step()
  if latest is not None:
    state, _ = checkpointer.restore(latest, trainer.abstract_state(), trainer.opt_paths)
    start = int(state["step"])
    if start != latest:
      raise ValueError(f"checkpoint {latest} in {checkpointer.directory} holds step {start}")
    if start > tcfg.steps:
      warnings.warn(f"the checkpoint in {checkpointer.directory} is at step {start}, past "
                    f"TrainConfig.steps={tcfg.steps}", stacklevel=2)
  else:
    if params is None:
      raise ValueError(f"no checkpoint in {checkpointer.directory} to resume from and "
                       "no params given")
    state = trainer.init_state(params)
    start = 0

  meta = {"opt_paths": trainer.opt_paths, "data_mode": checkpointer.mode,
          "variant": cfg.variant, "family": cfg.family, "train_config": repr(tcfg)}
  bar = _progress_bar(tcfg, start)
  writer = MetricsWriter(workdir, start, tensorboard=tcfg.tensorboard,
                         write_fn=None if bar is None else bar.write,
                         enabled=sharding.is_primary())
  last_saved = latest
  last: dict[str, Any] = {}
  step = start
  stop = preemption.StopOnSignal().__enter__()   # SIGTERM: save at the step, then exit
  try:
    while step < tcfg.steps:
      t0 = time.perf_counter()
      try:
        raw = next(data_iter)
      except StopIteration:
        raise ValueError(f"the data iterator ran out after {step} steps (TrainConfig.steps="
                         f"{tcfg.steps}); repeat the dataset (e.g. MapDataset.repeat())"
                         ) from None
      compile_before = trainer.compile_s
      state, m = trainer.step(state, raw)
      step += 1
      dt = time.perf_counter() - t0 - (trainer.compile_s - compile_before)
      if not m["finite"]:
        where = (f"the last good checkpoint (step {last_saved}) in {checkpointer.directory} "
                 "is intact" if last_saved is not None else "no checkpoint was written")
        raise NonFiniteLossError(
            f"non-finite training loss at step {step}: loss={float(m['loss'])}, "
            f"grad_norm={float(m['grad_norm'])}; the update was not applied and {where} "
            "(lower the lr, check the data and params)")
      last = {"loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
              **({"phrase_loss": float(m["phrase_loss"])} if "phrase_loss" in m else {}),
              "lr": float(trainer.schedule(step - 1)), "grad_norm": float(m["grad_norm"]),
              "answer_tokens": int(m["answer_tokens"]),
              "tokens_per_s": float(m["text_tokens"]) / max(dt, 1e-9), "step_time": dt}
      row = dict(last) if step % tcfg.log_every == 0 or step == tcfg.steps else {}
      if eval_fn is not None and ((tcfg.eval_every and step % tcfg.eval_every == 0)
                                  or step == tcfg.steps):
        row.update({f"eval/{k}": v for k, v in dict(eval_fn(state["params"], step)).items()})
      if row:
        writer.write(step, row)
      stopping = stop.requested()
      if step % tcfg.checkpoint_every == 0 or step == tcfg.steps or stopping:
        checkpointer.save(step, state, dict(meta, step=step))
        last_saved = step
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
      if stopping and step < tcfg.steps:
        raise stop.stop(f"at step {step} of {tcfg.steps}; checkpoint saved in "
                        f"{checkpointer.directory}")
    saved = sorted(checkpointer.all_steps())
  finally:
    stop.__exit__(None, None, None)
    writer.close()
    if bar is not None:
      bar.close()
    checkpointer.close()

  params = state["params"]
  if PHRASE_HEADS in params:            # training-only heads: not part of the model
    params = {k: v for k, v in params.items() if k != PHRASE_HEADS}
  if tcfg.export_final:
    from auditdm_jax.models.handle import VLM  # pylint: disable=import-outside-toplevel
    VLM(cfg, params, tokenizer).save(os.path.join(workdir, "final"))
  summary = {"start_step": start, "steps": step, "resumed": latest is not None,
             "final": last, "compile_s": trainer.compile_s,
             "wall_s": time.perf_counter() - t_begin, "checkpoints": saved}
  if sharding.is_primary():
    atomic_write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  return params, summary
