"""`VLM`: one loaded model (config, params, tokenizer) with `score` and `generate`.

API conventions (shared by every caller in auditdm_jax):
- images: uint8 [B, H, W, 3] at the model's resolution (one image per row);
- prompts, answers: lists of token-id lists, one per row;
- a PaliGemma prompt is exactly the text that follows the image tokens
  (the caller includes BOS and the "\\n" separator: `Tokenizer.paligemma_prompt`);
- a Gemma 3 prompt holds one `<start_of_image>` token where the image goes;
  the model expands it into the image block;
- `score` returns, per row, one log-probability per answer token.

`generate` here is the plain reference decoder (a full forward pass per new
token, no KV cache); the fast sharded sampler lives in `auditdm_jax.sampling`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax.models import ckpt, vlm
from auditdm_jax.models.ckpt import npz, orbax_io
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.inputs import (bucket_length, check_images, check_rows, default_stop_ids,
                                       pad_rows, prompt_heads, score_batch)
from auditdm_jax.models.tokenizer import Tokenizer


@dataclasses.dataclass
class GenerateOutput:
  tokens: list[list[int]]       # new tokens per row, up to and including a stop token
  logprobs: list[np.ndarray]    # log p(token) under the untempered model, per new token


def token_logprobs(cfg: VLMConfig, params, images, tokens, input_mask, mask_ar):
  """log p(tokens[:, t] | image, tokens[:, <t]) [B, T] (traceable; 0 where
  nothing precedes). PaliGemma's first text token is predicted by the last
  image token; mask_ar marks the causal (answer) part."""
  module = vlm.build(cfg)
  if cfg.family == "paligemma":
    n_img = cfg.num_image_tokens
    logits = module.apply({"params": params}, images, tokens, input_mask, mask_ar).logits
    pred, target = logits[:, n_img - 1:-1], tokens
  else:
    logits = module.apply({"params": params}, images, tokens, input_mask).logits
    pred, target = logits[:, :-1], tokens[:, 1:]
  lsm = jax.nn.log_softmax(pred.astype(jnp.float32), axis=-1)
  lp = jnp.take_along_axis(lsm, target[..., None], axis=-1)[..., 0]
  if cfg.family != "paligemma":
    lp = jnp.pad(lp, ((0, 0), (1, 0)))
  return lp


@functools.lru_cache(maxsize=32)
def _token_logprobs_fn(cfg: VLMConfig):
  return jax.jit(functools.partial(token_logprobs, cfg))


@functools.lru_cache(maxsize=32)
def _decoder_fn(cfg: VLMConfig, max_new_tokens: int, greedy: bool):
  """Jitted reference decoder: one full forward pass per new token."""
  module, family = vlm.build(cfg), cfg.family
  n_img = cfg.num_image_tokens

  def fn(params, images, tokens, prompt_len, stop_ids, temperature, rng):
    b, t = tokens.shape
    pos = jnp.arange(t)[None]
    rows = jnp.arange(b)

    def body(state):
      step, toks, lps, done, key = state
      cur = prompt_len + step                     # index the new token goes to
      input_mask = pos < cur[:, None]
      if family == "paligemma":
        mask_ar = (pos >= prompt_len[:, None]).astype(jnp.int32)
        logits = module.apply({"params": params}, images, toks, input_mask, mask_ar).logits
        last = logits[rows, n_img + cur - 1]
      else:
        logits = module.apply({"params": params}, images, toks, input_mask).logits
        last = logits[rows, cur - 1]
      logp = jax.nn.log_softmax(last.astype(jnp.float32), axis=-1)
      key, sub = jax.random.split(key)
      if greedy:
        nxt = jnp.argmax(logp, axis=-1)
      else:
        nxt = jax.random.categorical(sub, logp / temperature, axis=-1)
      nxt = jnp.where(done, 0, nxt).astype(jnp.int32)
      toks = toks.at[rows, cur].set(jnp.where(done, toks[rows, cur], nxt))
      lps = lps.at[:, step].set(jnp.where(done, 0.0, logp[rows, nxt]))
      done = done | jnp.isin(nxt, stop_ids)
      return step + 1, toks, lps, done, key

    def cond(state):
      step, _, _, done, _ = state
      return (step < max_new_tokens) & ~jnp.all(done)

    lps = jnp.zeros((b, max_new_tokens), jnp.float32)
    init = (jnp.int32(0), tokens, lps, jnp.zeros((b,), jnp.bool_), rng)
    _, toks, lps, _, _ = jax.lax.while_loop(cond, body, init)
    return toks, lps

  return jax.jit(fn)


class VLM:
  """A model handle: `config`, `params`, `tokenizer` (or None), `score`, `generate`."""

  def __init__(self, config: VLMConfig, params, tokenizer: Tokenizer | None = None):
    self.config = config
    # Host arrays stay on the host (a loaded 28B checkpoint must not land on
    # one device); samplers and trainers place them with their shardings.
    self.params = jax.tree.map(
        lambda x: x if isinstance(x, jax.Array) else np.asarray(x), params)
    self.tokenizer = tokenizer

  @classmethod
  def random(cls, config: VLMConfig, seed: int = 0, tokenizer: Tokenizer | None = None):
    return cls(config, vlm.init_params(config, jax.random.key(seed)), tokenizer)

  # -- scoring ---------------------------------------------------------------
  def score(self, images, prompts, answers) -> list[np.ndarray]:
    """Per row, log p(answer_t | image, prompt, answer_<t) for each answer token."""
    tokens, input_mask, mask_ar, spans = score_batch(self.config, prompts, answers)
    images = check_images(self.config, images, len(spans))
    lp = np.asarray(_token_logprobs_fn(self.config)(self.params, images, tokens,
                                                    input_mask, mask_ar))
    return [lp[i, start:start + n] for i, (start, n) in enumerate(spans)]

  # -- generation ------------------------------------------------------------
  def default_stop_ids(self) -> list[int]:
    return default_stop_ids(self.config, self.tokenizer)

  def generate(self, images, prompts, max_new_tokens: int = 32, temperature: float = 0.0,
               rng=None, stop_ids: Sequence[int] | None = None) -> GenerateOutput:
    """Decodes up to max_new_tokens per row (greedy when temperature == 0)."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not np.isfinite(temperature):
      raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    prompts = check_rows(self.config, prompts, "prompts", allow_empty=False)
    images = check_images(self.config, images, len(prompts))
    heads = prompt_heads(self.config, prompts)
    tokens, plen = pad_rows(heads, bucket_length(max(len(h) for h in heads) + max_new_tokens))
    stops = np.asarray(list(stop_ids) if stop_ids is not None else self.default_stop_ids(),
                       np.int32)
    rng = jax.random.key(0) if rng is None else rng
    fn = _decoder_fn(self.config, int(max_new_tokens), temperature == 0.0)
    toks, lps = fn(self.params, images, tokens, plen, stops,
                   jnp.float32(max(temperature, 1e-6)), rng)
    toks, lps = np.asarray(toks), np.asarray(lps)
    out_t, out_l = [], []
    stop_set = set(stops.tolist())
    for i, p in enumerate(plen):
      new = toks[i, p:p + max_new_tokens].tolist()
      n = next((j + 1 for j, tok in enumerate(new) if tok in stop_set), len(new))
      out_t.append(new[:n])
      out_l.append(lps[i, :n])
    return GenerateOutput(out_t, out_l)

  # -- persistence -----------------------------------------------------------
  def save(self, path: str) -> None:
    """Our own Orbax format (config.json-like metadata + params + tokenizer)."""
    import tempfile  # pylint: disable=import-outside-toplevel
    if self.tokenizer is None:
      orbax_io.save_native(path, self.config, self.params)
      return
    with tempfile.TemporaryDirectory() as d:
      tok = f"{d}/tokenizer.model"
      self.tokenizer.save(tok)
      orbax_io.save_native(path, self.config, self.params, tok)

  def export_npz(self, path: str) -> None:
    """big_vision .npz (PaliGemma models)."""
    npz.export_npz(path, self.params, self.config)


def load(path: str, *, config: VLMConfig | None = None, tokenizer: str | None = None,
         dtype: str | None = None, param_dtype: str | None = None,
         image_size: int | None = None) -> VLM:
  """Loads any supported checkpoint into a `VLM`: `ckpt.read` (big_vision
  .npz, Hugging Face, official Gemma 3 Orbax, ours; local or gs://; the
  keywords are documented there) wrapped in the handle."""
  c = ckpt.read(path, config=config, tokenizer=tokenizer, dtype=dtype,
                param_dtype=param_dtype, image_size=image_size)
  return VLM(c.config, c.params, c.tokenizer)
