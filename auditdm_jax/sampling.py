"""Sharded KV-cache sampling and scoring for PaliGemma 2 / Gemma 3 VLMs.

`Sampler(model, mesh, rules)` places the model's parameters on the mesh by the
partition rules and compiles two functions per shape bucket:

  prefill  (params, images, prompt tokens, lengths) -> per-layer KV caches,
           logits of the first new token, row lengths; one full forward pass
           with the model's own mask (PaliGemma prefix-LM, Gemma 3 image
           blocks), then every row is repeated `num_samples` times (GRPO groups).
  decode   a `lax.while_loop` of single-token steps over the caches (donated),
           until every row hit a stop token or max_new_tokens.

Caches: global layers keep [prefix + max_new_tokens] slots; sliding-window
layers keep a ring of `sliding_window` slots (slot = position % window), so
their memory is bounded however long the sequence grows. Every slot records
its position (-1 when empty) and decode attention is masked by position
alone, which handles rows of different prompt lengths without re-aligning.

Outputs per row: the new tokens (pad after the stop token), their count, and
per-token log-probabilities both under the sampling distribution (after
temperature / top-k / top-p; 0 for greedy, a point mass) and under the
untempered model (what GRPO's importance ratios need); `score` recomputes the
latter for any tokens.

Prompt lengths are padded to buckets of `length_bucket`, so repeated calls
with similar prompts reuse the compiled functions (`num_compiles` counts
traces).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from auditdm_jax import sharding
from auditdm_jax.models import logical, vlm
from auditdm_jax.models.decode import decode_step, decode_weights
from auditdm_jax.models.handle import VLM, token_logprobs
from auditdm_jax.models.inputs import (LENGTH_BUCKET, bucket_length, check_images, check_rows,
                                       default_stop_ids, pad_rows, prompt_heads, score_batch)

MAX_STOP_IDS = 8


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int = 32
  temperature: float = 1.0      # 0: greedy
  top_k: int = 0                # 0: off
  top_p: float = 1.0            # 1: off
  num_samples: int = 1          # samples per prompt (a GRPO group)

  def __post_init__(self):
    problems = []
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      problems.append(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
    if not np.isfinite(self.temperature) or self.temperature < 0:
      problems.append(f"temperature must be finite and >= 0, got {self.temperature!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      problems.append(f"top_k must be an int >= 0, got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
    if not isinstance(self.num_samples, int) or self.num_samples < 1:
      problems.append(f"num_samples must be an int >= 1, got {self.num_samples!r}")
    if problems:
      raise ValueError("invalid SamplingParams: " + "; ".join(problems))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass
class SampleOutput:
  tokens: np.ndarray          # int32 [B*num_samples, max_new_tokens], pad after stop
  lengths: np.ndarray         # int32 [B*num_samples], including the stop token
  logprobs: np.ndarray        # float32, under the sampling distribution
  model_logprobs: np.ndarray  # float32, under the untempered model
  num_samples: int = 1        # rows b*num_samples ... (b+1)*num_samples-1 share prompt b

  def rows(self) -> list[list[int]]:
    return [self.tokens[i, :n].tolist() for i, n in enumerate(self.lengths)]


def first_argmax(x):
  """jnp.argmax over the last axis (the first of equal maxima), as the max and
  then the lowest index holding it: two plain reductions, which XLA:CPU runs
  ~3x faster than argmax's variadic (value, index) reduce over a vocabulary.
  (A row of NaN gives the last index, where jnp.argmax gives the NaN's.)"""
  v = x.shape[-1]
  top = jnp.max(x, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(x == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(first, v - 1)


def sample_token(logits, key, params: SamplingParams):
  """(token [B], log p_sampling(token), log p_model(token)) from logits [B, V]."""
  logits = logits.astype(jnp.float32)
  logp_model = jax.nn.log_softmax(logits, axis=-1)
  if params.greedy:
    tok = first_argmax(logits)
    return tok, jnp.zeros(tok.shape, jnp.float32), jnp.take_along_axis(
        logp_model, tok[:, None], -1)[:, 0]
  scaled = logits / params.temperature
  if params.top_k and params.top_k < scaled.shape[-1]:
    kth = jax.lax.top_k(scaled, params.top_k)[0][:, -1:]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  if params.top_p < 1.0:
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs       # mass strictly above each entry
    keep = before < params.top_p                       # always keeps the top entry
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
  logp_sample = jax.nn.log_softmax(scaled, axis=-1)
  # jax.random.categorical's draw (the Gumbel-max trick), with the faster argmax.
  tok = first_argmax(logp_sample + jax.random.gumbel(key, logp_sample.shape, logp_sample.dtype))
  pick = lambda a: jnp.take_along_axis(a, tok[:, None], -1)[:, 0]  # noqa: E731
  return tok, pick(logp_sample), pick(logp_model)


def ring_layout(total_len, ring: int):
  """For each ring slot r [0, ring), the position p < total_len with
  p % ring == r that a filled ring holds (the latest such), or -1."""
  r = jnp.arange(ring)[None, :]
  last = total_len[:, None] - 1
  pos = r + ring * jnp.floor_divide(last - r, ring)
  return jnp.where(last >= r, pos, -1)


class Sampler:
  """Sharded sampling and scoring of one VLM on a (possibly shared) mesh."""

  def __init__(self, model: VLM, mesh: Mesh | None = None, rules=None,
               cache_dtype: str | None = None, length_bucket: int = LENGTH_BUCKET,
               activation_rules=None):
    self.cfg = model.config
    self.tokenizer = model.tokenizer
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    self.rules = sharding.rules_from_config(rules)
    self.activation_rules = activation_rules
    self.cache_dtype = jnp.dtype(cache_dtype or self.cfg.text.dtype)
    self.length_bucket = length_bucket
    # XLA:CPU multiplies by the embedding table ~1.4x faster laid out [D, V]:
    # decoding on CPU transposes it once per call (`decode.decode_step` head).
    self.transposed_head = all(d.platform == "cpu" for d in self.mesh.devices.flat)
    self.param_shardings = sharding.param_shardings(vlm.abstract_params(self.cfg),
                                                    self.mesh, self.rules)
    self.params = jax.device_put(model.params, self.param_shardings)
    self.traces = collections.Counter()

  def set_params(self, params) -> None:
    """Swaps in new weights of the same model (a policy after an update, another
    checkpoint), placed with this sampler's shardings; the compiled functions
    are kept. A tree of other paths, shapes or dtypes is refused by name."""
    old = jax.tree_util.tree_flatten_with_path(self.params)[0]
    new = jax.tree_util.tree_flatten_with_path(params)[0]
    key = lambda leaves: {jax.tree_util.keystr(p): (tuple(np.shape(v)), jnp.dtype(v.dtype))
                          for p, v in leaves}
    a, b = key(old), key(new)
    if a != b:
      diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      raise ValueError(f"set_params: the new weights differ from the sampler's model at "
                       f"{diff[:5]}{' ...' if len(diff) > 5 else ''} (path: (shape, dtype) "
                       f"{[(k, a.get(k), b.get(k)) for k in diff[:2]]})")
    self.params = jax.device_put(params, self.param_shardings)

  @property
  def num_compiles(self) -> int:
    return sum(self.traces.values())

  # -- shardings -------------------------------------------------------------
  def _batch(self, shape) -> NamedSharding:
    return NamedSharding(self.mesh, sharding.batch_spec(shape[0], self.mesh, len(shape)))

  def _cache_sharding(self, batch: int) -> NamedSharding:
    spec = logical.spec_for((batch, 1, self.cfg.text.num_kv_heads, 1),
                            ("batch", None, "kv_heads", None), self.mesh,
                            self.activation_rules or logical.ACTIVATION_RULES)
    return NamedSharding(self.mesh, spec)

  def cache_lengths(self, prefix_len: int, max_new: int) -> list[int]:
    """Slots per layer: prefix + max_new, or the window for local layers."""
    t = self.cfg.text
    full = prefix_len + max_new
    return [min(full, t.sliding_window) if kind == "local" and t.sliding_window else full
            for kind in t.layer_types]

  def _prefix_len(self, text_len: int) -> int:
    return text_len + (self.cfg.num_image_tokens if self.cfg.family == "paligemma" else 0)

  # -- prefill ---------------------------------------------------------------
  @functools.lru_cache(maxsize=16)
  def _prefill_fn(self, batch: int, text_len: int, max_new: int, num_samples: int):
    cfg, mesh = self.cfg, self.mesh
    module = vlm.build(cfg)
    prefix = self._prefix_len(text_len)
    lens = self.cache_lengths(prefix, max_new)
    n_img = cfg.num_image_tokens if cfg.family == "paligemma" else 0

    def fn(params, images, tokens, lengths):
      self.traces["prefill"] += 1
      with logical.activation_sharding(mesh, self.activation_rules):
        input_mask = jnp.arange(text_len)[None] < lengths[:, None]
        args = (images, tokens, input_mask)
        if cfg.family == "paligemma":
          args += (jnp.zeros_like(tokens),)
        out = module.apply({"params": params}, *args, return_hidden=True, return_kv=True)
        hidden, (k, v) = out.hidden, out.kv
        total = lengths + n_img
        # One-hot pick of each row's last prefix position (partitions cleanly,
        # where a gather would force the sharded hidden states to replicate).
        pick = jax.nn.one_hot(total - 1, hidden.shape[1], dtype=hidden.dtype)
        last = jnp.einsum("BT,BTD->BD", pick, hidden)[:, None]
        logits = module.apply({"params": params}, last,
                              method=lambda m, h: m.llm.logits(h))[:, 0]
        caches = []
        slots = jnp.arange(prefix)[None]
        for i, n in enumerate(lens):
          ki, vi = k[i], v[i]
          if n < prefix + max_new:           # ring of a sliding-window layer
            pos = ring_layout(total, n)
            src = jnp.maximum(pos, 0)[..., None, None]
            ki = jnp.take_along_axis(ki, src, axis=1)
            vi = jnp.take_along_axis(vi, src, axis=1)
          else:
            pad = ((0, 0), (0, n - prefix), (0, 0), (0, 0))
            ki, vi = jnp.pad(ki, pad), jnp.pad(vi, pad)
            pos = jnp.pad(jnp.where(slots < total[:, None], slots, -1),
                          ((0, 0), (0, n - prefix)), constant_values=-1)
          caches.append({"k": ki.astype(self.cache_dtype), "v": vi.astype(self.cache_dtype),
                         "pos": pos.astype(jnp.int32)})
        rep = lambda a: jnp.repeat(a, num_samples, axis=0)  # noqa: E731
        return jax.tree.map(rep, caches), rep(logits), rep(total)

    bk = batch * num_samples
    cache_sh = self._cache_sharding(bk)
    pos_sh = NamedSharding(mesh, sharding.batch_spec(bk, mesh, 2))
    cache_out = [{"k": cache_sh, "v": cache_sh, "pos": pos_sh} for _ in lens]
    s = self.cfg.vision.image_size
    return jax.jit(
        fn,
        in_shardings=(self.param_shardings, self._batch((batch, s, s, 3)),
                      self._batch((batch, text_len)), self._batch((batch,))),
        out_shardings=(cache_out, self._batch((bk, cfg.text.vocab_size)), self._batch((bk,))))

  # -- decode ----------------------------------------------------------------
  @functools.lru_cache(maxsize=16)
  def _decode_fn(self, rows: int, prefix: int, params: SamplingParams):
    cfg, mesh = self.cfg, self.mesh
    max_new = params.max_new_tokens
    lens = self.cache_lengths(prefix, max_new)
    full = prefix + max_new

    def fn(model_params, caches, logits, total, rng, stop_ids):
      self.traces["decode"] += 1
      with logical.activation_sharding(mesh, self.activation_rules):
        llm = model_params["llm"]
        weights = decode_weights(cfg.text, llm["layers"])   # once, outside the loop
        head = llm["embedder"]["input_embedding"].T if self.transposed_head else None

        def body(state):
          step, logits, toks, lps, lpm, n, done, caches = state
          tok, lp_s, lp_m = sample_token(logits, jax.random.fold_in(rng, step), params)
          live = ~done
          tok = jnp.where(live, tok, cfg.pad_id).astype(jnp.int32)
          toks = toks.at[:, step].set(tok)
          lps = lps.at[:, step].set(jnp.where(live, lp_s, 0.0))
          lpm = lpm.at[:, step].set(jnp.where(live, lp_m, 0.0))
          n = n + live.astype(jnp.int32)
          done = done | jnp.isin(tok, stop_ids)
          q_pos = total + step
          slots = [q_pos % c if c < full else prefix + step for c in lens]
          new_logits, caches = decode_step(cfg.text, llm, weights, tok, q_pos, caches,
                                           slots, head)
          return step + 1, new_logits, toks, lps, lpm, n, done, caches

        def cond(state):
          return (state[0] < max_new) & ~jnp.all(state[6])

        zf = jnp.zeros((rows, max_new), jnp.float32)
        state = (jnp.int32(0), logits, jnp.full((rows, max_new), cfg.pad_id, jnp.int32),
                 zf, zf, jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.bool_), caches)
        _, _, toks, lps, lpm, n, _, caches = jax.lax.while_loop(cond, body, state)
        # Returning the caches lets XLA update the donated buffers in place.
        return toks, n, lps, lpm, caches

    cache_sh = self._cache_sharding(rows)
    pos_sh = NamedSharding(mesh, sharding.batch_spec(rows, mesh, 2))
    cache_in = [{"k": cache_sh, "v": cache_sh, "pos": pos_sh} for _ in lens]
    out = self._batch((rows, max_new))
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        fn, donate_argnums=(1,),
        in_shardings=(self.param_shardings, cache_in, self._batch((rows, cfg.text.vocab_size)),
                      self._batch((rows,)), rep, rep),
        out_shardings=(out, self._batch((rows,)), out, out, cache_in))

  # -- public ----------------------------------------------------------------
  def sample(self, images, prompts, params: SamplingParams = SamplingParams(), rng=None,
             stop_ids: Sequence[int] | None = None) -> SampleOutput:
    """Samples params.num_samples continuations per (image, prompt) row."""
    cfg = self.cfg
    prompts = check_rows(cfg, prompts, "prompts", allow_empty=False)
    images = check_images(cfg, images, len(prompts))
    heads = prompt_heads(cfg, prompts)
    text_len = bucket_length(max(len(h) for h in heads), self.length_bucket)
    tokens, lengths = pad_rows(heads, text_len)
    stops = list(default_stop_ids(cfg, self.tokenizer) if stop_ids is None else stop_ids)
    if len(stops) > MAX_STOP_IDS:
      raise ValueError(f"at most {MAX_STOP_IDS} stop ids, got {len(stops)}")
    stops = np.asarray(stops + [-1] * (MAX_STOP_IDS - len(stops)), np.int32)
    rng = jax.random.key(0) if rng is None else rng
    prefill = self._prefill_fn(len(heads), text_len, params.max_new_tokens,
                               params.num_samples)
    # Explicit placement: on several processes a jit refuses host arrays for
    # sharded inputs (every process passes the same rows).
    images, tokens, lengths = (jax.device_put(np.asarray(x), self._batch(np.shape(x)))
                               for x in (images, tokens, lengths))
    caches, logits, total = prefill(self.params, images, tokens, lengths)
    decode = self._decode_fn(len(heads) * params.num_samples, self._prefix_len(text_len),
                             params)
    toks, n, lps, lpm, _ = decode(self.params, caches, logits, total, rng, stops)
    toks, n, lps, lpm = sharding.to_host((toks, n, lps, lpm))
    return SampleOutput(toks, n, lps, lpm, params.num_samples)

  @functools.lru_cache(maxsize=16)
  def _score_fn(self, batch: int, length: int):
    s = self.cfg.vision.image_size

    def fn(params, images, tokens, input_mask, mask_ar):
      self.traces["score"] += 1
      with logical.activation_sharding(self.mesh, self.activation_rules):
        return token_logprobs(self.cfg, params, images, tokens, input_mask, mask_ar)

    tok = self._batch((batch, length))
    return jax.jit(fn, in_shardings=(self.param_shardings, self._batch((batch, s, s, 3)),
                                     tok, tok, tok), out_shardings=tok)

  def score(self, images, prompts, answers) -> list[np.ndarray]:
    """Sharded `VLM.score`: per row, log p of each answer token."""
    tokens, input_mask, mask_ar, spans = score_batch(self.cfg, prompts, answers,
                                                     self.length_bucket)
    images = check_images(self.cfg, images, len(spans))
    args = (jax.device_put(np.asarray(x), self._batch(np.shape(x)))
            for x in (images, tokens, input_mask, mask_ar))
    lp = sharding.to_host(self._score_fn(*tokens.shape)(self.params, *args))
    return [lp[i, a:a + n] for i, (a, n) in enumerate(spans)]
