"""Our Gemma 3 VLM as a tunix model: config check, weight conversion and a
greedy-decode wrapper around tunix's KV-cache `Sampler` (the benchmark peer of
`auditdm_jax.sampling.Sampler` in bench/sampling.py).

tunix (google-tunix, flax nnx) is imported inside the functions only: the
bench's optional peer, never a dependency of auditdm_jax. The parameter names
and layouts below were read from tunix 0.1.7's `tunix/models/gemma3/model.py`
and `vision.py`:

  ours (linen, layers stacked on axis 0)         tunix (nnx, one module per layer)
  llm/embedder/input_embedding [V, D]            embedder/input_embedding
  llm/embedder/mm_soft_embedding_norm/scale      embedder/mm_soft_embedding_norm/scale
  llm/embedder/mm_input_projection/w [Dv, D]     embedder/mm_input_projection/w
  llm/layers/attn/q_einsum/w [L, N, D, H]        layers/i/attn/q_einsum/w       (N != K)
  llm/layers/attn/kv_einsum/w [L, 2, K, D, H]    layers/i/attn/kv_einsum/w      (N != K)
    (both, N == K)                               layers/i/attn/qkv_einsum/w [3, N, D, H]
  llm/layers/attn/{query,key}_norm/scale         layers/i/attn/_{query,key}_norm/scale
  llm/layers/attn/attn_vec_einsum/w [L, N, H, D] layers/i/attn/attn_vec_einsum/w
  llm/layers/mlp/gating_einsum [L, 2, D, F]      layers/i/mlp/{gate,up}_proj/kernel [D, F]
  llm/layers/mlp/linear [L, F, D]                layers/i/mlp/down_proj/kernel
  llm/layers/<norm>/scale                        layers/i/<norm>/scale
  llm/final_norm/scale                           final_norm/scale
  img/embedding/{kernel,bias}, img/pos_embedding vision_encoder/siglip_encoder/...
  img/Transformer/encoderblock/...               .../transformer/blocks/j/{ln1,ln2,attn,mlp}
      MultiHeadDotProductAttention_0/query/kernel [L, W, h, hd] -> attn/query_proj/kernel [W, W]
      MlpBlock_0/Dense_{0,1}                                    -> mlp/fc{1,2}
  img/Transformer/encoder_norm                   .../transformer/encoder_norm

What tunix's Gemma 3 cannot express (and `tunix_config` refuses by name): a
layer pattern other than 5 local : 1 global, no QK-norm or no post-norms,
attention / final logit soft-capping, an RMSNorm epsilon other than 1e-6,
linear RoPE scaling on the local layers, a query scale other than head_dim or
width / num_heads, fixed sin-cos vision position embeddings, and computing in
a dtype other than the parameters' (tunix computes in its parameter dtype).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# tunix's Sampler reads this as its pad id: tokens equal to it are treated as
# padding, also among the generated tokens. Ours never treats a generated token
# as padding, so the peer uses an id no model can produce (left padding is
# masked, so its embedding row, the table's last, is never attended to).
PAD_ID = -1

_GEMMA3_PATTERN = ("local",) * 5 + ("global",)


def installed_version(dist: str) -> str:
  """The installed version of a distribution, for the benches' headers."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return "(not installed)"


def tunix_config(cfg, sampling: bool = True):
  """tunix `ModelConfig` of the same shapes as our Gemma 3 `VLMConfig`
  (vision tower included), with tunix's default sharding for sampling or (not
  `sampling`) for training. Raises ValueError naming every feature of ours
  that tunix's Gemma 3 lacks."""
  from tunix.models.gemma3 import model as tmodel  # pylint: disable=import-outside-toplevel
  from tunix.models.gemma3 import vision as tvision  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  t, v = cfg.text, cfg.vision
  problems = []
  if cfg.family != "gemma3":
    problems.append(f"family is {cfg.family!r}; tunix's Gemma 3 model is the gemma3 family")
  if t.layer_types != tuple(_GEMMA3_PATTERN[i % 6] for i in range(t.depth)):
    problems.append(f"layer types {t.layer_types!r}: tunix fixes Gemma 3's "
                    "5 local : 1 global cycle")
  if not t.sliding_window:
    problems.append("no sliding_window: tunix's local layers need one")
  if not t.qk_norm:
    problems.append("qk_norm is off: tunix always normalises queries and keys")
  if not t.post_norms:
    problems.append("post_norms is off: tunix always applies them")
  if t.attn_logits_softcap or t.final_logits_softcap:
    problems.append("logit soft-capping: tunix's Gemma 3 has none")
  if t.norm_eps != 1e-6 or v.layer_norm_eps != 1e-6:
    problems.append(f"norm eps {t.norm_eps} / {v.layer_norm_eps}: tunix fixes 1e-6")
  if t.rope_scale_local != 1.0 or t.rope_scale_global < 1.0:
    problems.append(f"RoPE scales local {t.rope_scale_local}, global {t.rope_scale_global}: "
                    "tunix supports local 1.0 and global >= 1.0")
  scalar = t.query_pre_attn_scalar or t.head_dim
  norm = tmodel.QueryPreAttentionNormalisation
  if scalar == t.head_dim:
    query_norm = norm.BY_ONE_OVER_SQRT_HEAD_DIM
  elif scalar == t.width // t.num_heads:
    query_norm = norm.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
  else:
    query_norm = None
    problems.append(f"query_pre_attn_scalar {scalar}: tunix scales queries by head_dim "
                    f"({t.head_dim}) or width / num_heads ({t.width // t.num_heads}) only")
  if v.posemb != "learn":
    problems.append(f"vision posemb {v.posemb!r}: tunix's SigLIP has a learned table")
  if v.out_dim is not None:
    problems.append("vision out_dim is set: tunix's SigLIP has no head")
  if jnp.dtype(t.dtype) != jnp.dtype(t.param_dtype) or \
      jnp.dtype(v.dtype) != jnp.dtype(t.param_dtype) or \
      jnp.dtype(v.param_dtype) != jnp.dtype(t.param_dtype):
    problems.append(f"dtypes text {t.dtype}/{t.param_dtype}, vision {v.dtype}/{v.param_dtype}: "
                    "tunix computes in one parameter dtype; use the same everywhere")
  if problems:
    raise ValueError("this model cannot be expressed as a tunix Gemma 3: "
                     + "; ".join(problems))
  vision = tvision.SigLIPConfig(
      num_mm_tokens_per_image_prepool=v.num_patches,
      num_mm_tokens_per_image=cfg.mm_tokens_per_image,
      image_height=v.image_size, image_width=v.image_size,
      soft_token_placeholder=cfg.image_token_id,
      patch_size=(v.patch_size, v.patch_size), width=v.width, depth=v.depth,
      mlp_dim=v.mlp_dim, num_heads=v.num_heads)
  return tmodel.ModelConfig(
      num_layers=t.depth, num_embed=t.vocab_size, embed_dim=t.width,
      hidden_dim=t.mlp_dim, num_heads=t.num_heads, head_dim=t.head_dim,
      num_kv_heads=t.num_kv_heads, sliding_window_size=t.sliding_window,
      local_base_frequency=t.rope_base_local, global_base_frequency=t.rope_base_global,
      local_scale_factor=t.rope_scale_local, global_scale_factor=t.rope_scale_global,
      query_pre_attn_norm=query_norm, vision_config=vision,
      shd_config=tmodel.ShardingConfig.get_default_sharding(is_sampling=sampling),
      param_dtype=jnp.dtype(t.param_dtype))


def tunix_params(cfg, params) -> dict[tuple, np.ndarray]:
  """Our params ({"img", "llm"}) as tunix's flat parameter paths -> arrays."""
  t, v = cfg.text, cfg.vision
  llm, img = params["llm"], params["img"]
  a = lambda x: np.asarray(x)  # noqa: E731
  out = {
      ("embedder", "input_embedding"): a(llm["embedder"]["input_embedding"]),
      ("embedder", "mm_soft_embedding_norm", "scale"):
          a(llm["embedder"]["mm_soft_embedding_norm"]["scale"]),
      ("embedder", "mm_input_projection", "w"): a(llm["embedder"]["mm_input_projection"]["w"]),
      ("final_norm", "scale"): a(llm["final_norm"]["scale"]),
  }
  lay, att = llm["layers"], llm["layers"]["attn"]
  for i in range(t.depth):
    p = ("layers", i)
    q, kv = a(att["q_einsum"]["w"][i]), a(att["kv_einsum"]["w"][i])
    if t.num_heads == t.num_kv_heads:
      out[p + ("attn", "qkv_einsum", "w")] = np.concatenate([q[None], kv], axis=0)
    else:
      out[p + ("attn", "q_einsum", "w")] = q
      out[p + ("attn", "kv_einsum", "w")] = kv
    out[p + ("attn", "_query_norm", "scale")] = a(att["query_norm"]["scale"][i])
    out[p + ("attn", "_key_norm", "scale")] = a(att["key_norm"]["scale"][i])
    out[p + ("attn", "attn_vec_einsum", "w")] = a(att["attn_vec_einsum"]["w"][i])
    gating = a(lay["mlp"]["gating_einsum"][i])
    out[p + ("mlp", "gate_proj", "kernel")] = gating[0]
    out[p + ("mlp", "up_proj", "kernel")] = gating[1]
    out[p + ("mlp", "down_proj", "kernel")] = a(lay["mlp"]["linear"][i])
    for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
      out[p + (norm, "scale")] = a(lay[norm]["scale"][i])

  enc = ("vision_encoder", "siglip_encoder")
  out[enc + ("embedding", "kernel")] = a(img["embedding"]["kernel"])
  out[enc + ("embedding", "bias")] = a(img["embedding"]["bias"])
  out[enc + ("pos_embedding",)] = a(img["pos_embedding"])
  blk, w = img["Transformer"]["encoderblock"], v.width
  mha = blk["MultiHeadDotProductAttention_0"]
  for j in range(v.depth):
    p = enc + ("transformer", "blocks", j)
    for ours_ln, theirs_ln in (("LayerNorm_0", "ln1"), ("LayerNorm_1", "ln2")):
      for leaf in ("scale", "bias"):
        out[p + (theirs_ln, leaf)] = a(blk[ours_ln][leaf][j])
    for ours_proj, theirs_proj in (("query", "query_proj"), ("key", "key_proj"),
                                   ("value", "value_proj")):
      out[p + ("attn", theirs_proj, "kernel")] = a(mha[ours_proj]["kernel"][j]).reshape(w, w)
      out[p + ("attn", theirs_proj, "bias")] = a(mha[ours_proj]["bias"][j]).reshape(w)
    out[p + ("attn", "out_proj", "kernel")] = a(mha["out"]["kernel"][j]).reshape(w, w)
    out[p + ("attn", "out_proj", "bias")] = a(mha["out"]["bias"][j])
    for ours_dense, theirs_fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      for leaf in ("kernel", "bias"):
        out[p + ("mlp", theirs_fc, leaf)] = a(blk["MlpBlock_0"][ours_dense][leaf][j])
  norm = img["Transformer"]["encoder_norm"]
  out[enc + ("transformer", "encoder_norm", "scale")] = a(norm["scale"])
  out[enc + ("transformer", "encoder_norm", "bias")] = a(norm["bias"])
  return out


def to_tunix(cfg, params, sampling: bool = True):
  """A tunix `Gemma3` (nnx) holding our weights (sharding annotations for
  sampling, or for training when not `sampling`). Every tunix parameter must
  be filled, with its own shape and dtype; a mismatch is named."""
  import flax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tunix.models.gemma3 import model as tmodel  # pylint: disable=import-outside-toplevel

  model = tmodel.Gemma3(tunix_config(cfg, sampling), rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  theirs = flax.traverse_util.flatten_dict(state.to_pure_dict())
  ours = tunix_params(cfg, params)
  missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
  bad = [(k, ours[k].shape, tuple(theirs[k].shape)) for k in sorted(set(ours) & set(theirs))
         if ours[k].shape != tuple(theirs[k].shape)]
  if missing or extra or bad:
    raise ValueError(f"weight conversion does not fit tunix's Gemma 3: tunix parameters "
                     f"left unfilled {missing[:5]}, converted names tunix lacks {extra[:5]}, "
                     f"shape mismatches (ours, tunix) {bad[:5]}")
  filled = {k: jnp.asarray(ours[k], dtype=theirs[k].dtype) for k in theirs}
  state.replace_by_pure_dict(flax.traverse_util.unflatten_dict(filled))
  nnx.update(model, state)
  return model


def pixels(images) -> np.ndarray:
  """uint8 [B, H, W, 3] -> the float pixels tunix's SigLIP takes (what ours
  computes from uint8 inside the model)."""
  return np.asarray(images).astype(np.float32) / 127.5 - 1.0


_IMAGE_ROWS = {}


def with_image_rows(model, row_pixels):
  """tunix's `Gemma3` wrapped so that every multi-token forward without images
  sees `row_pixels` (float [N, H, W, 3], row i's image): tunix 0.1.7's RL
  stack (rollout, reference and policy log-probabilities) calls the model
  with tokens only, so a VLM policy trained by its `GRPOLearner` gets its
  images here. Prefill and full forwards (more than one token) take the
  images; single-token decode steps do not. A full forward without a cache
  (tunix's RL scoring) gets Gemma 3's attention mask (bidirectional within the
  image block, as the sampler's prefill and our model use) in place of the
  causal mask tunix's RL code builds. The batch must have N rows (a clear
  error otherwise). The pixels are an nnx Variable that is not a Param:
  passed to the jitted functions as state, never trained."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  if "cls" not in _IMAGE_ROWS:
    class RowPixels(nnx.Variable):
      """The images of the batch rows (not a parameter)."""

    class ImageRows(nnx.Module):
      """tunix Gemma3 + the images of a fixed batch of rows."""

      def __init__(self, inner, pix):
        self.model = inner
        self.pixels = RowPixels(jnp.asarray(pix))
        self.config = inner.config

      def get_attention_mask(self, tokens, *, inputs_mask=None):
        return self.model.get_attention_mask(tokens, inputs_mask=inputs_mask)

      def __call__(self, last_tokens, positions=None, cache=None, attention_mask=None,
                   output_hidden_states=False, *, images=None):
        if images is None and last_tokens.shape[1] > 1:
          pix = self.pixels[...]
          if last_tokens.shape[0] != pix.shape[0]:
            raise ValueError(f"a batch of {last_tokens.shape[0]} rows, but the wrapped "
                             f"model holds the images of {pix.shape[0]} rows")
          images = pix
          if cache is None:
            # tunix's RL mask is causal; its diagonal is the rows' input mask.
            inputs_mask = jnp.diagonal(attention_mask, axis1=1, axis2=2)
            attention_mask = self.model.get_attention_mask(last_tokens, inputs_mask=inputs_mask)
        return self.model(last_tokens, positions, cache, attention_mask, output_hidden_states,
                          images=images)

    _IMAGE_ROWS["cls"] = ImageRows
  return _IMAGE_ROWS["cls"](model, row_pixels)


class _IdTokenizer:
  """The tokenizer interface tunix's Sampler needs, over space-separated token
  ids: our prompts are id lists, so text is just their decimal form."""

  def encode(self, text: str, **_) -> list[int]:
    return [int(x) for x in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None  # our prompts already start with BOS

  def eos_id(self) -> int:
    return PAD_ID

  def pad_id(self) -> int:
    return PAD_ID


class TunixGemma3:
  """Greedy decoding of our Gemma 3 VLM through tunix's KV-cache `Sampler`:
  same prompts (ours: one <start_of_image> per row, expanded here), same
  uint8 images, same weights."""

  def __init__(self, model, cache_size: int):
    from tunix.generate import sampler as tsampler  # pylint: disable=import-outside-toplevel
    self.cfg = model.config
    self.model = to_tunix(self.cfg, model.params)
    t = self.cfg.text
    self.cache_size = cache_size
    self.sampler = tsampler.Sampler(
        self.model, _IdTokenizer(),
        tsampler.CacheConfig(cache_size=cache_size, num_layers=t.depth,
                             num_kv_heads=t.num_kv_heads, head_dim=t.head_dim))

  def generate(self, images, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               return_logits: bool = False):
    """(new tokens int32 [B, max_new_tokens], per-row logits [max_new_tokens, V]
    of each step or None). Rows are left-padded to the longest prompt, which
    plus max_new_tokens must fit the cache."""
    from auditdm_jax.models.inputs import prompt_heads  # pylint: disable=import-outside-toplevel
    heads = prompt_heads(self.cfg, prompts)
    longest = max(len(h) for h in heads)
    if longest + max_new_tokens > self.cache_size:
      raise ValueError(f"prompt ({longest} tokens after the image block) + {max_new_tokens} "
                       f"new tokens exceed the tunix cache of {self.cache_size}")
    out = self.sampler([" ".join(map(str, h)) for h in heads],
                       max_generation_steps=max_new_tokens, max_prompt_length=longest,
                       eos_tokens=[PAD_ID], return_logits=return_logits,
                       images=pixels(images))
    tokens = np.stack([np.asarray(x) for x in out.tokens]).astype(np.int32)
    if tokens.shape != (len(heads), max_new_tokens):
      raise RuntimeError(f"tunix returned tokens of shape {tokens.shape}, expected "
                         f"{(len(heads), max_new_tokens)}")
    return tokens, ([np.asarray(x) for x in out.logits] if return_logits else None)


def last_prompt_logits(model, images, prompts) -> np.ndarray:
  """Our model's logits [B, V] at each row's last prompt position (a full
  forward pass, the reference for the peers' prefill logits)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from auditdm_jax.models import vlm  # pylint: disable=import-outside-toplevel
  from auditdm_jax.models import inputs  # pylint: disable=import-outside-toplevel
  heads = inputs.prompt_heads(model.config, prompts)
  tokens, lengths = inputs.pad_rows(heads, max(len(h) for h in heads))
  mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
  logits = vlm.build(model.config).apply({"params": model.params}, jnp.asarray(images),
                                         jnp.asarray(tokens), jnp.asarray(mask)).logits
  return np.asarray(logits)[np.arange(len(heads)), lengths - 1]
