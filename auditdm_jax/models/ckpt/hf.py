"""Hugging Face checkpoints (config.json + safetensors) of PaliGemma 2 and Gemma 3.

We read safetensors ourselves (an 8-byte header length, a JSON header, raw
little-endian tensors) so that bfloat16 needs no torch and a truncated file is
caught with the tensor's name. Weight names are accepted in both layouts the
hub has used: `language_model.model.layers.N...` / `vision_tower.vision_model...`
(transformers 4.x, and what 5.x writes back) and
`model.language_model.layers.N...` / `model.vision_tower...` (5.x in memory).

Mapping to our (big_vision) layout, per text layer:
  q_proj [N*H, D]           -> attn/q_einsum/w [N, D, H]
  k_proj, v_proj [K*H, D]   -> attn/kv_einsum/w [2, K, D, H]
  o_proj [D, N*H]           -> attn/attn_vec_einsum/w [N, H, D]
  gate_proj, up_proj [F, D] -> mlp/gating_einsum [2, D, F]
  down_proj [D, F]          -> mlp/linear [F, D]
  input_layernorm / post_attention_layernorm / pre_feedforward_layernorm /
  post_feedforward_layernorm -> pre_attention_norm / post_attention_norm /
  pre_ffw_norm / post_ffw_norm;  q_norm / k_norm -> attn/query_norm, key_norm
and for SigLIP: patch_embedding [D, 3, P, P] -> embedding/kernel [P, P, 3, D],
q/k/v_proj [D, D] -> {query,key,value}/kernel [D, h, hd], out_proj ->
out/kernel [h, hd, D], fc1/fc2 -> MlpBlock_0/Dense_0/1, layer_norm1/2 ->
LayerNorm_0/1, post_layernorm -> encoder_norm.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from auditdm_jax.models.ckpt.common import (BFLOAT16, CheckpointError, Taker,
                                            adjust_vocab_rows, assemble)
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.gemma import GemmaConfig
from auditdm_jax.models.siglip import SigLIPConfig, resample_posemb

_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": BFLOAT16, "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """{name: array} of one .safetensors file (memory-mapped, read-only)."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"checkpoint {path}: file too short for a safetensors header")
      n = int.from_bytes(head, "little")
      if n <= 0 or 8 + n > size:
        raise CheckpointError(f"checkpoint {path}: header length {n} does not fit "
                              f"the file size {size} (truncated or not safetensors)")
      header = json.loads(f.read(n))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"checkpoint {path}: unreadable safetensors header: {e}") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"checkpoint {path}: safetensors header is not a JSON object")
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else None
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = _ST_DTYPES[info["dtype"]]
      shape = tuple(int(s) for s in info["shape"])
      start, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"checkpoint {path}: tensor {name!r} has a malformed "
                            f"header entry {info!r}") from e
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - start != nbytes or data is None or end > data.shape[0]:
      raise CheckpointError(
          f"checkpoint {path}: tensor {name!r} (shape {shape}, {info['dtype']}) "
          f"needs bytes [{start}, {end}) but the data section has "
          f"{0 if data is None else data.shape[0]} bytes (truncated file?)")
    out[name] = data[start:end].view(dtype).reshape(shape)
  return out


def read_hf_dir(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, all tensors) of a Hugging Face model directory."""
  cfg_path = os.path.join(path, "config.json")
  try:
    with open(cfg_path) as f:
      config = json.load(f)
  except FileNotFoundError as e:
    raise CheckpointError(f"checkpoint {path}: no config.json") from e
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"checkpoint {cfg_path}: unreadable JSON: {e}") from e
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"checkpoint {index}: malformed shard index: {e}") from e
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"checkpoint {path}: no .safetensors files")
  tensors = {}
  for name in files:
    tensors.update(read_safetensors(os.path.join(path, name)))
  return config, tensors


# ----------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------


def _get(d: dict, key: str, source: str, default: Any = KeyError):
  if key in d and d[key] is not None:
    return d[key]
  if default is KeyError:
    raise CheckpointError(f"checkpoint {source}: config.json lacks {key!r}")
  return default


def _vision_from_hf(v: dict, source: str, out_dim: int | None) -> SigLIPConfig:
  return SigLIPConfig(
      image_size=int(_get(v, "image_size", source)),
      patch_size=int(_get(v, "patch_size", source)),
      width=int(_get(v, "hidden_size", source)),
      depth=int(_get(v, "num_hidden_layers", source)),
      mlp_dim=int(_get(v, "intermediate_size", source)),
      num_heads=int(_get(v, "num_attention_heads", source)),
      layer_norm_eps=float(_get(v, "layer_norm_eps", source, 1e-6)),
      out_dim=out_dim)


def _rope(t: dict, layer_type: str, default_base: float) -> tuple[float, float]:
  """(base, linear scale) for one layer type, from old or new HF rope fields."""
  params = t.get("rope_parameters")
  if isinstance(params, dict) and layer_type in params:
    params = params[layer_type] or {}
  elif isinstance(params, dict) and "rope_theta" in params:
    pass
  else:  # transformers 4.x fields
    params = {"rope_theta": t.get("rope_theta", default_base)}
    if layer_type == "sliding_attention" and "rope_local_base_freq" in t:
      params = {"rope_theta": t["rope_local_base_freq"]}
    elif layer_type == "full_attention" and t.get("rope_scaling"):
      params = dict(t["rope_scaling"], rope_theta=t.get("rope_theta", default_base))
  base = float(params.get("rope_theta", default_base))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ("default", "linear"):
    raise CheckpointError(f"unsupported RoPE type {kind!r} for {layer_type} layers")
  scale = float(params.get("factor", 1.0)) if kind == "linear" else 1.0
  return base, scale


def _text_from_hf(t: dict, source: str, family: str,
                  vision_proj_dim: int | None) -> GemmaConfig:
  model_type = t.get("model_type", "gemma2" if family == "paligemma" else "gemma3_text")
  if model_type not in ("gemma", "gemma2", "gemma3_text", "gemma3"):
    raise CheckpointError(f"checkpoint {source}: unsupported text model_type {model_type!r}")
  depth = int(_get(t, "num_hidden_layers", source))
  width = int(_get(t, "hidden_size", source))
  heads = int(_get(t, "num_attention_heads", source))
  layer_types = t.get("layer_types")
  window = t.get("sliding_window") if model_type != "gemma" else None
  if layer_types is None:
    if model_type == "gemma2":
      layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(depth)]
    elif model_type.startswith("gemma3"):
      pat = int(t.get("sliding_window_pattern", 6))
      layer_types = ["sliding_attention" if (i + 1) % pat else "full_attention" for i in range(depth)]
    else:
      layer_types = ["full_attention"] * depth
  pattern = tuple("local" if lt == "sliding_attention" else "global" for lt in layer_types)
  if "local" not in pattern:
    window = None
  base_l, scale_l = _rope(t, "sliding_attention", 10_000.0)
  base_g, scale_g = _rope(t, "full_attention",
                          1_000_000.0 if model_type.startswith("gemma3") else 10_000.0)
  gemma1 = model_type == "gemma"
  return GemmaConfig(
      width=width, depth=depth, mlp_dim=int(_get(t, "intermediate_size", source)),
      num_heads=heads, num_kv_heads=int(_get(t, "num_key_value_heads", source, heads)),
      head_dim=int(_get(t, "head_dim", source, width // heads)),
      vocab_size=int(_get(t, "vocab_size", source)),
      norm_eps=float(t.get("rms_norm_eps", 1e-6)),
      post_norms=not gemma1, qk_norm=model_type.startswith("gemma3"),
      query_pre_attn_scalar=None if gemma1 else t.get("query_pre_attn_scalar"),
      attn_logits_softcap=None if gemma1 else t.get("attn_logit_softcapping"),
      final_logits_softcap=None if gemma1 else t.get("final_logit_softcapping"),
      attention_pattern=pattern if window else ("global",),
      sliding_window=int(window) if window else None,
      rope_base_local=base_l, rope_scale_local=scale_l,
      rope_base_global=base_g, rope_scale_global=scale_g,
      vision_proj_dim=vision_proj_dim)


def config_from_hf(config: dict, source: str, image_wrap_id: int | None = None) -> VLMConfig:
  family = config.get("model_type")
  text, vision = config.get("text_config"), config.get("vision_config")
  if family not in ("paligemma", "gemma3") or not isinstance(text, dict) \
      or not isinstance(vision, dict):
    raise CheckpointError(
        f"checkpoint {source}: config.json model_type is {family!r}; expected a "
        "'paligemma' or 'gemma3' VLM with text_config and vision_config")
  try:
    if family == "paligemma":
      t = _text_from_hf(text, source, "paligemma", None)
      v = _vision_from_hf(vision, source, out_dim=t.width)
      return VLMConfig(family="paligemma", variant=config.get("_name_or_path") or "hf-paligemma",
                       vision=v, text=t, bos_id=int(text.get("bos_token_id", 2)),
                       eos_id=_first(text.get("eos_token_id", 1)),
                       pad_id=int(text.get("pad_token_id", 0) or 0))
    v = _vision_from_hf(vision, source, out_dim=None)
    t = _text_from_hf(text, source, "gemma3", v.width)
    if image_wrap_id is None and t.vocab_size >= 262_144:
      image_wrap_id = 108  # "\n\n" in the Gemma 3 tokenizer
    return VLMConfig(
        family="gemma3", variant=config.get("_name_or_path") or "hf-gemma3", vision=v,
        text=t, mm_tokens_per_image=int(config.get("mm_tokens_per_image", 256)),
        boi_id=int(config.get("boi_token_index", config.get("boi_token_id", 255_999))),
        eoi_id=int(config.get("eoi_token_index", config.get("eoi_token_id", 256_000))),
        image_token_id=int(config.get("image_token_index",
                                      config.get("image_token_id", 262_144))),
        image_wrap_id=image_wrap_id, bos_id=int(text.get("bos_token_id", 2)),
        eos_id=_first(text.get("eos_token_id", 1)),
        pad_id=int(text.get("pad_token_id", 0) or 0))
  except (TypeError, ValueError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"checkpoint {source}: config.json does not describe a "
                          f"valid model: {e}") from e


def _first(x) -> int:
  return int(x[0] if isinstance(x, (list, tuple)) else x)


def hf_config_dict(cfg: VLMConfig) -> dict[str, Any]:
  """The transformers config.json equivalent of our config (for export and for
  comparisons against the reference implementation)."""
  t, v = cfg.text, cfg.vision
  types = ["sliding_attention" if lt == "local" else "full_attention" for lt in t.layer_types]
  vision = dict(model_type="siglip_vision_model", hidden_size=v.width,
                intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                num_attention_heads=v.num_heads, image_size=v.image_size,
                patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                vision_use_head=False, hidden_act="gelu_pytorch_tanh")
  text = dict(hidden_size=t.width, intermediate_size=t.mlp_dim,
              num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
              num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
              vocab_size=t.vocab_size, rms_norm_eps=t.norm_eps,
              query_pre_attn_scalar=t.query_pre_attn_scalar or t.head_dim,
              attn_logit_softcapping=t.attn_logits_softcap,
              final_logit_softcapping=t.final_logits_softcap,
              sliding_window=t.sliding_window or 4096, layer_types=types,
              bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id,
              hidden_activation="gelu_pytorch_tanh")
  if cfg.family == "paligemma":
    text.update(model_type="gemma2" if t.post_norms else "gemma",
                rope_parameters=dict(rope_type="default", rope_theta=t.rope_base_global))
    return dict(model_type="paligemma", text_config=text, vision_config=vision,
                projection_dim=t.width, vocab_size=t.vocab_size,
                image_token_index=t.vocab_size - 1)

  def rope(base, scale):
    if scale == 1.0:
      return dict(rope_type="default", rope_theta=base)
    return dict(rope_type="linear", rope_theta=base, factor=scale)

  text.update(model_type="gemma3_text", rope_parameters=dict(
      sliding_attention=rope(t.rope_base_local, t.rope_scale_local),
      full_attention=rope(t.rope_base_global, t.rope_scale_global)))
  return dict(model_type="gemma3", text_config=text, vision_config=vision,
              mm_tokens_per_image=cfg.mm_tokens_per_image, boi_token_index=cfg.boi_id,
              eoi_token_index=cfg.eoi_id, image_token_index=cfg.image_token_id)


# ----------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------

_PREFIXES = [
    (r"^(?:model\.)?language_model\.model\.", "text."),
    (r"^model\.language_model\.", "text."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^lm_head\.", "lm_head."),
    (r"^(?:model\.)?vision_tower\.vision_model\.", "vision."),
    (r"^(?:model\.)?vision_tower\.", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.", "proj."),
]


def _canonical(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, arr in tensors.items():
    for pat, rep in _PREFIXES:
      new, n = re.subn(pat, rep, name)
      if n:
        out[new] = arr
        break
    else:
      out["other." + name] = arr
  return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: VLMConfig, source: str) -> dict:
  take = Taker(_canonical(tensors), source, dtype=None, strict_now=True)
  flat = _llm_params(take, cfg, source)
  flat.update(_vision_params(take, cfg, source))
  # The SigLIP attention-pooling head (vision_use_head) is unused by both VLMs.
  leftover = [key for key in take.unused() if not key.startswith("vision.head.")]
  if leftover:
    raise CheckpointError(f"checkpoint {source}: unexpected tensors "
                          f"{leftover[:8]}{' ...' if len(leftover) > 8 else ''}")
  return assemble(flat, cfg, source)


def _llm_params(take: Taker, cfg: VLMConfig, source: str) -> dict[str, np.ndarray]:
  """The language model's tensors (our flat names), the tied head checked."""
  t = cfg.text
  n, k, h, d = t.num_heads, t.num_kv_heads, t.head_dim, t.width
  L = t.depth
  lay = "text.layers.{}."
  flat = {}

  def q_w(w):
    return _reshape(w, (n, h, d), source, "q_proj").transpose(0, 2, 1)

  def kv_w(w):
    return _reshape(w, (k, h, d), source, "k/v_proj").transpose(0, 2, 1)

  flat["llm/embedder/input_embedding"] = adjust_vocab_rows(
      take("text.embed_tokens.weight"), t.vocab_size)
  flat["llm/layers/attn/q_einsum/w"] = take.stack(lay + "self_attn.q_proj.weight", L, q_w)
  flat["llm/layers/attn/kv_einsum/w"] = np.stack(
      [take.stack(lay + "self_attn.k_proj.weight", L, kv_w),
       take.stack(lay + "self_attn.v_proj.weight", L, kv_w)], axis=1)
  flat["llm/layers/attn/attn_vec_einsum/w"] = take.stack(
      lay + "self_attn.o_proj.weight", L,
      lambda w: _reshape(w, (d, n, h), source, "o_proj").transpose(1, 2, 0))
  flat["llm/layers/mlp/gating_einsum"] = np.stack(
      [take.stack(lay + "mlp.gate_proj.weight", L, np.transpose),
       take.stack(lay + "mlp.up_proj.weight", L, np.transpose)], axis=1)
  flat["llm/layers/mlp/linear"] = take.stack(lay + "mlp.down_proj.weight", L, np.transpose)
  norms = {"input_layernorm": "pre_attention_norm",
           "pre_feedforward_layernorm": "pre_ffw_norm"}
  if t.post_norms:
    norms.update(post_attention_layernorm="post_attention_norm",
                 post_feedforward_layernorm="post_ffw_norm")
  else:  # Gemma 1 calls its pre-MLP norm post_attention_layernorm.
    norms = {"input_layernorm": "pre_attention_norm",
             "post_attention_layernorm": "pre_ffw_norm"}
  for hf_name, ours in norms.items():
    flat[f"llm/layers/{ours}/scale"] = take.stack(lay + hf_name + ".weight", L)
  if t.qk_norm:
    flat["llm/layers/attn/query_norm/scale"] = take.stack(lay + "self_attn.q_norm.weight", L)
    flat["llm/layers/attn/key_norm/scale"] = take.stack(lay + "self_attn.k_norm.weight", L)
  flat["llm/final_norm/scale"] = take("text.norm.weight")
  lm_head = take("lm_head.weight") if take.has("lm_head.weight") else None
  if lm_head is not None and not np.array_equal(
      adjust_vocab_rows(np.asarray(lm_head), t.vocab_size),
      flat["llm/embedder/input_embedding"]):
    raise CheckpointError(f"checkpoint {source}: lm_head.weight differs from the "
                          "token embedding; Gemma ties them and untied heads are "
                          "not supported")
  return flat


def _vision_params(take: Taker, cfg: VLMConfig, source: str) -> dict[str, np.ndarray]:
  """The vision tower's and the projection's tensors (our flat names)."""
  v = cfg.vision
  flat = {}
  vd, vh = v.width, v.num_heads
  blk = "vision.encoder.layers.{}."
  pre = "img/Transformer/encoderblock/"
  kernel = take("vision.embeddings.patch_embedding.weight")
  flat["img/embedding/kernel"] = kernel.transpose(2, 3, 1, 0)
  flat["img/embedding/bias"] = take("vision.embeddings.patch_embedding.bias")
  flat["img/pos_embedding"] = resample_posemb(
      take("vision.embeddings.position_embedding.weight")[None], v.grid)
  for i, name in (("1", "LayerNorm_0"), ("2", "LayerNorm_1")):
    flat[pre + f"{name}/scale"] = take.stack(blk + f"layer_norm{i}.weight", v.depth)
    flat[pre + f"{name}/bias"] = take.stack(blk + f"layer_norm{i}.bias", v.depth)
  att = pre + "MultiHeadDotProductAttention_0/"
  for hf_name, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    flat[att + f"{ours}/kernel"] = take.stack(
        blk + f"self_attn.{hf_name}.weight", v.depth,
        lambda w: _reshape(w.T, (vd, vh, vd // vh), source, hf_name))
    flat[att + f"{ours}/bias"] = take.stack(
        blk + f"self_attn.{hf_name}.bias", v.depth,
        lambda b: _reshape(b, (vh, vd // vh), source, hf_name))
  flat[att + "out/kernel"] = take.stack(
      blk + "self_attn.out_proj.weight", v.depth,
      lambda w: _reshape(w.T, (vh, vd // vh, vd), source, "out_proj"))
  flat[att + "out/bias"] = take.stack(blk + "self_attn.out_proj.bias", v.depth)
  for i in (0, 1):
    flat[pre + f"MlpBlock_0/Dense_{i}/kernel"] = take.stack(
        blk + f"mlp.fc{i + 1}.weight", v.depth, np.transpose)
    flat[pre + f"MlpBlock_0/Dense_{i}/bias"] = take.stack(blk + f"mlp.fc{i + 1}.bias", v.depth)
  flat["img/Transformer/encoder_norm/scale"] = take("vision.post_layernorm.weight")
  flat["img/Transformer/encoder_norm/bias"] = take("vision.post_layernorm.bias")
  if cfg.family == "paligemma":
    flat["img/head/kernel"] = take("proj.linear.weight").T
    flat["img/head/bias"] = take("proj.linear.bias")
  else:
    flat["llm/embedder/mm_input_projection/w"] = take("proj.mm_input_projection_weight")
    flat["llm/embedder/mm_soft_embedding_norm/scale"] = take("proj.mm_soft_emb_norm.weight")
  return flat


def _reshape(w: np.ndarray, shape: tuple[int, ...], source: str, what: str) -> np.ndarray:
  if int(np.prod(w.shape)) != int(np.prod(shape)):
    raise CheckpointError(f"checkpoint {source}: {what} weight has shape "
                          f"{tuple(w.shape)}, which cannot hold {shape} for this config")
  return np.asarray(w).reshape(shape)
