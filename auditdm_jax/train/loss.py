"""The supervised loss: answer-token NLL (token-weighted over the batch) and the
optional phrase grounding term on the final hidden state."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax

from auditdm_jax.models import vlm
from auditdm_jax.models.config import VLMConfig


def _forward_args(cfg: VLMConfig, batch, rng):
  """(module, positional model inputs, rngs) of a training batch."""
  args = (batch["images"], batch["tokens"], batch["input_mask"])
  if cfg.family == "paligemma":
    args += (batch["mask_ar"],)
  return vlm.build(cfg), args, None if rng is None else {"dropout": rng}


def aligned_logits(cfg: VLMConfig, params, batch, rng=None, return_hidden: bool = False):
  """(logits float32 [B, T', V], target ids [B, T']) where logits[:, t]
  predicts target[:, t]. PaliGemma: T' = T (the last image token predicts the
  first text token); Gemma 3: T' = T - 1 (text token t predicts t + 1).
  With return_hidden, also the final hidden states [B, S, D] of the whole
  sequence (PaliGemma: image tokens first), from the same forward pass."""
  module, args, rngs = _forward_args(cfg, batch, rng)
  tokens = batch["tokens"]
  paligemma = cfg.family == "paligemma"
  out = module.apply({"params": params}, *args, rngs=rngs)
  logits, hidden = out.logits, out.hidden
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


def slot_logits(cfg: VLMConfig, params, batch, rng=None):
  """(logits float32 [B, K, V], target ids [B, K], valid [B, K]) at the loss
  tokens named by batch["loss_pos"] [B, K] (text positions, -1 unused;
  `batches.loss_positions`): one forward pass to the final hidden states, the
  vocabulary projection only at the K predicting positions. Equal to
  `aligned_logits` read at those tokens."""
  module, args, rngs = _forward_args(cfg, batch, rng)
  tokens = batch["tokens"]
  paligemma = cfg.family == "paligemma"
  hidden = module.apply({"params": params}, *args, return_hidden=True, rngs=rngs).hidden
  pos = batch["loss_pos"]
  valid = pos >= 0
  p = jnp.maximum(pos, 0)
  # the hidden state predicting text token t: PaliGemma's sequence is [image
  # tokens, text], so n_img - 1 + t; Gemma 3's image block is inside the text,
  # so t - 1 (token 0 is never a loss token).
  at = p + (cfg.num_image_tokens - 1 if paligemma else -1)
  h = jnp.take_along_axis(hidden, jnp.maximum(at, 0)[..., None], axis=1)   # [B, K, D]
  logits = module.apply({"params": params}, h,
                        method=lambda m, x: m.llm.logits(x)).astype(jnp.float32)
  target = jnp.clip(jnp.take_along_axis(tokens, p, axis=1), 0, logits.shape[-1] - 1)
  return logits, target, valid


def slot_stats(cfg: VLMConfig, params, batch, rng=None):
  """(log p, argmax == token, valid), each [B, K], at the loss tokens named by
  batch["loss_pos"] (`slot_logits`). Equal to `token_stats` read there."""
  logits, target, valid = slot_logits(cfg, params, batch, rng)
  lsm = jax.nn.log_softmax(logits, axis=-1)
  lp = jnp.take_along_axis(lsm, target[..., None], axis=-1)[..., 0]
  correct = jnp.argmax(logits, axis=-1) == target
  return lp, correct, valid


def scatter_slots(x, pos, length: int):
  """[B, K] values at text positions `pos` [B, K] (-1 unused) -> [B, length],
  0 where no slot names a position."""
  b = x.shape[0]
  at = jnp.where(pos >= 0, pos, length)             # unused slots fall off the end
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], pos.shape)
  return jnp.zeros((b, length), x.dtype).at[rows, at].set(x, mode="drop")


def batch_sums(cfg: VLMConfig, params, batch, rng=None):
  """(summed NLL, correct argmax count, loss-token count) over the batch
  (with batch["loss_pos"], from the named loss tokens only: `slot_stats`)."""
  if "loss_pos" in batch:
    lp, correct, valid = slot_stats(cfg, params, batch, rng)
    return (-jnp.sum(jnp.where(valid, lp, 0.0)),
            jnp.sum(correct & valid).astype(jnp.float32), jnp.sum(valid).astype(jnp.float32))
  return _sums(batch, *token_stats(cfg, params, batch, rng))


def loss_fn(cfg: VLMConfig, params, batch, rng=None):
  """(mean NLL over the batch's loss tokens, {"accuracy", "tokens"})."""
  nll, correct, n = batch_sums(cfg, params, batch, rng)
  d = jnp.maximum(n, 1.0)
  return nll / d, {"accuracy": correct / d, "tokens": n}


# ----------------------------------------------------------------------------
