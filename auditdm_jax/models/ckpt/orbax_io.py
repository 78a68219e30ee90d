"""Orbax checkpoints: the official Gemma 3 release (FLAT layout) and our own.

Official Gemma 3 (what `PyTreeCheckpointer().restore` returns): a one-level
dict whose keys hold '/' and whose values are small leaf dicts, e.g.
  'transformer/layer_3/attn/q_einsum': {'w': [N, D, H]}
  'transformer/layer_3/attn/_query_norm': {'scale': [H]}
  'transformer/layer_3/mlp/gating_einsum': {'w': [2, F, D]}   (note: F before D)
  'transformer/embedder': {'input_embedding': [262144, D]}
  'transformer/embedder/mm_input_projection': {'w': [1152, D]}
  'SigLiPFromPatches_0/siglip_encoder/Transformer/encoderblock_7/...': per layer
We also accept the gemma library's NESTED form of the same tree.

Our own format is a directory:
  auditdm_model.json   {"format": "auditdm_jax/model/v1", "config": {...},
                        "tokenizer": "tokenizer.model" | null}
  params/              Orbax StandardCheckpointer tree in our layout
  tokenizer.model      (optional) sentencepiece model
written to a temporary sibling directory and renamed into place; a failed
write (a full disk, a read-only directory) removes the temporary directory,
leaves the previous model directory as it was, and raises an OSError (errno
kept) naming the model directory.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import tempfile

import flax
import jax
import numpy as np

from auditdm_jax.models import presets
from auditdm_jax.models.ckpt.common import (CheckpointError, adjust_vocab_rows,
                                            assemble, flatten)
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.siglip import SigLIPConfig, resample_posemb
from auditdm_jax.utils.fileio import atomic_write_text, replace_dir, write_failed

NATIVE_MARKER = "auditdm_model.json"
NATIVE_FORMAT = "auditdm_jax/model/v1"
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
# Extra embedder entries some post-trained releases carry; unused by the model.
_IGNORED = ("mm_output_embedding", "mm_input_embedding_extra")


def is_orbax_dir(path: str) -> bool:
  return os.path.isdir(path) and any(
      os.path.exists(os.path.join(path, m)) for m in _ORBAX_MARKERS)


def _restore(path: str) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  try:
    return ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
  except Exception as e:  # orbax raises many types for corrupt directories
    raise CheckpointError(f"checkpoint {path}: Orbax could not restore it: "
                          f"{type(e).__name__}: {e}") from e


def _flatten_any(tree, prefix="") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten_any(v, key + "/"))
    else:
      out[key] = np.asarray(v)
  return out


# ----------------------------------------------------------------------------
# Official Gemma 3.
# ----------------------------------------------------------------------------


def read_gemma3(path: str) -> dict[str, np.ndarray]:
  """Fully '/'-flattened arrays of an official Gemma 3 Orbax checkpoint."""
  flat = _flatten_any(_restore(path))
  flat = {re.sub(r"^rlx_networks/policy_network/", "", k): v for k, v in flat.items()}
  # NESTED form -> FLAT names.
  renamed = {}
  for k, v in flat.items():
    k = re.sub(r"^vision_encoder/", "SigLiPFromPatches_0/", k)
    if not k.startswith(("transformer/", "SigLiPFromPatches_0/")):
      k = "transformer/" + k
    k = re.sub(r"/mlp/(gating_einsum|linear)$", r"/mlp/\1/w", k)
    renamed[k] = v
  if not any(k.startswith("transformer/layer_") for k in renamed):
    raise CheckpointError(f"checkpoint {path}: no 'transformer/layer_N' entries; "
                          "not a Gemma 3 checkpoint")
  return renamed


def _layer_count(flat, pattern) -> int:
  idx = {int(m.group(1)) for k in flat for m in [re.match(pattern, k)] if m}
  if idx != set(range(len(idx))):
    raise CheckpointError(f"layer indices are not contiguous: {sorted(idx)}")
  return len(idx)


def infer_gemma3_config(flat: dict, source: str) -> VLMConfig:
  def get(key, ndim):
    if key not in flat:
      raise CheckpointError(f"checkpoint {source}: missing key {key!r}")
    if flat[key].ndim != ndim:
      raise CheckpointError(f"checkpoint {source}: key {key!r} has shape "
                            f"{flat[key].shape}, expected {ndim} dimensions")
    return flat[key]

  depth = _layer_count(flat, r"^transformer/layer_(\d+)/")
  emb = get("transformer/embedder/input_embedding", 2)
  if "transformer/layer_0/attn/qkv_einsum/w" in flat:
    _, heads, width, head_dim = get("transformer/layer_0/attn/qkv_einsum/w", 4).shape
    kv_heads = heads
  else:
    heads, width, head_dim = get("transformer/layer_0/attn/q_einsum/w", 3).shape
    kv_heads = get("transformer/layer_0/attn/kv_einsum/w", 4).shape[1]
  mlp = get("transformer/layer_0/mlp/linear/w", 2).shape[0]
  text = presets.gemma3_text("4b")
  for size, (w, l, *_r) in presets._GEMMA3.items():  # pylint: disable=protected-access
    if (w, l) == (width, depth):
      text = presets.gemma3_text(size)
  proj = flat.get("transformer/embedder/mm_input_projection/w")
  text = dataclasses.replace(
      text, width=width, depth=depth, mlp_dim=mlp, num_heads=heads,
      num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=emb.shape[0],
      vision_proj_dim=None if proj is None else proj.shape[0])
  pre = "SigLiPFromPatches_0/siglip_encoder/"
  if proj is None:
    raise CheckpointError(f"checkpoint {source}: text-only Gemma 3 checkpoint (no "
                          "mm_input_projection); auditdm_jax needs the VLM")
  kernel = get(pre + "embedding/kernel", 4)
  pos = get(pre + "pos_embedding", 3)
  vdepth = _layer_count(flat, r"^SigLiPFromPatches_0/siglip_encoder/Transformer/encoderblock_(\d+)/")
  blk = pre + "Transformer/encoderblock_0/"
  vq = get(blk + "MultiHeadDotProductAttention_0/query/kernel", 3)
  vmlp = get(blk + "MlpBlock_0/Dense_0/kernel", 2)
  grid = int(round(np.sqrt(pos.shape[1])))
  vision = SigLIPConfig(image_size=grid * kernel.shape[0], patch_size=kernel.shape[0],
                        width=kernel.shape[-1], depth=vdepth, mlp_dim=vmlp.shape[-1],
                        num_heads=vq.shape[1])
  # Pooling has no parameters, so the soft-token count is not in the file: the
  # release pools 64x64 patches 4x4 to 16x16; other grids default to no pooling
  # (pass `config=` for models trained otherwise).
  side = 16 if grid % 16 == 0 else grid
  return presets.gemma3("4b").replace(
      variant=os.path.basename(os.path.normpath(source)), vision=vision, text=text,
      mm_tokens_per_image=side * side)


def params_from_gemma3(flat: dict, cfg: VLMConfig, source: str) -> dict:
  if cfg.family != "gemma3":
    raise CheckpointError(f"checkpoint {source} is a Gemma 3 checkpoint but the "
                          f"config is {cfg.family}")
  flat = {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] not in _IGNORED}
  out = {}
  depth = _layer_count(flat, r"^transformer/layer_(\d+)/")
  per_layer: dict[str, list] = {}
  vision_layers: dict[str, list] = {}
  for key in sorted(flat):
    arr = flat[key]
    if m := re.match(r"^transformer/layer_(\d+)/(.*)$", key):
      per_layer.setdefault(m.group(2), [None] * depth)[int(m.group(1))] = arr
    elif m := re.match(r"^SigLiPFromPatches_0/siglip_encoder/Transformer/"
                       r"encoderblock_(\d+)/(.*)$", key):
      vision_layers.setdefault(m.group(2), {})[int(m.group(1))] = arr
    elif key.startswith("SigLiPFromPatches_0/siglip_encoder/"):
      out["img/" + key[len("SigLiPFromPatches_0/siglip_encoder/"):]] = arr
    elif key.startswith("transformer/"):
      out["llm/" + key[len("transformer/"):]] = arr
    else:
      out[key] = arr  # reported as unexpected by assemble()
  for name, arrs in per_layer.items():
    if any(a is None for a in arrs):
      missing = [i for i, a in enumerate(arrs) if a is None]
      raise CheckpointError(f"checkpoint {source}: {name!r} missing for layers {missing}")
    stacked = _stack(arrs, source, "transformer/layer_N/" + name)
    name = name.replace("attn/_query_norm", "attn/query_norm")
    name = name.replace("attn/_key_norm", "attn/key_norm")
    if name == "attn/qkv_einsum/w":
      out["llm/layers/attn/q_einsum/w"] = stacked[:, 0]
      out["llm/layers/attn/kv_einsum/w"] = stacked[:, 1:]
      continue
    if name == "mlp/gating_einsum/w":
      name, stacked = "mlp/gating_einsum", stacked.transpose(0, 1, 3, 2)  # [L,2,F,D]->[L,2,D,F]
    elif name == "mlp/linear/w":
      name = "mlp/linear"
    out["llm/layers/" + name] = stacked
  for name, by_idx in vision_layers.items():
    if sorted(by_idx) != list(range(len(by_idx))):
      raise CheckpointError(f"checkpoint {source}: vision block {name!r} has "
                            f"layers {sorted(by_idx)}")
    out["img/Transformer/encoderblock/" + name] = _stack(
        [by_idx[i] for i in range(len(by_idx))], source, "encoderblock_N/" + name)
  key = "llm/embedder/input_embedding"
  if key in out:
    out[key] = adjust_vocab_rows(out[key], cfg.text.vocab_size)
  if "img/pos_embedding" in out and out["img/pos_embedding"].ndim == 3:
    out["img/pos_embedding"] = resample_posemb(out["img/pos_embedding"], cfg.vision.grid)
  return assemble(out, cfg, source)


def _stack(arrs, source, name):
  shapes = {a.shape for a in arrs}
  if len(shapes) != 1:
    raise CheckpointError(f"checkpoint {source}: {name!r} has different shapes "
                          f"across layers: {sorted(shapes)}")
  return np.stack(arrs)


def write_gemma3_flat(path: str, params, cfg: VLMConfig) -> None:
  """Writes our Gemma 3 params in the official FLAT Orbax layout."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  flat = flatten(params)
  tree: dict[str, dict] = {}

  def put(key, leaf, arr):
    tree.setdefault(key, {})[leaf] = np.asarray(arr)

  for key, arr in flat.items():
    if key.startswith("llm/layers/"):
      name = key[len("llm/layers/"):]
      name = name.replace("attn/query_norm", "attn/_query_norm")
      name = name.replace("attn/key_norm", "attn/_key_norm")
      if name == "mlp/gating_einsum":
        name, arr = "mlp/gating_einsum/w", arr.transpose(0, 1, 3, 2)
      elif name == "mlp/linear":
        name = "mlp/linear/w"
      for i in range(cfg.text.depth):
        node, leaf = name.rsplit("/", 1)
        put(f"transformer/layer_{i}/{node}", leaf, arr[i])
    elif key.startswith("llm/"):
      node, leaf = ("transformer/" + key[4:]).rsplit("/", 1)
      put(node, leaf, arr)
    elif key.startswith("img/Transformer/encoderblock/"):
      name = key[len("img/Transformer/encoderblock/"):]
      node, leaf = name.rsplit("/", 1)
      for i in range(cfg.vision.depth):
        put(f"SigLiPFromPatches_0/siglip_encoder/Transformer/encoderblock_{i}/{node}",
            leaf, arr[i])
    else:
      node, leaf = ("SigLiPFromPatches_0/siglip_encoder/" + key[4:]).rsplit("/", 1)
      put(node, leaf, arr)
  _save_dir_atomically(path, lambda tmp: ocp.PyTreeCheckpointer().save(tmp, tree))


# ----------------------------------------------------------------------------
# Our own format.
# ----------------------------------------------------------------------------


def _save_dir_atomically(path: str, write) -> None:
  """write(tmp) fills a temporary sibling directory, which then replaces
  `path` in one rename; on any failure the sibling is removed and `path` is
  left as it was."""
  tmp = _tmp_sibling(path)
  try:
    write(tmp)
    replace_dir(tmp, path, "model_moved_aside")
  except Exception as e:
    _remove_tmp(tmp)
    raise _save_failed(path, tmp, e) from e
  except BaseException:
    _remove_tmp(tmp)
    raise


def _tmp_sibling(path: str) -> str:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.normpath(path))}.",
                         suffix=".tmp", dir=parent)
  os.rmdir(tmp)  # orbax wants to create it
  return tmp


def _remove_tmp(tmp: str) -> None:
  """Removes a failed save's temporary directory (and Orbax's own unfinished
  `<tmp>.orbax-checkpoint-tmp*` beside it, if any)."""
  for p in [tmp, *glob.glob(glob.escape(tmp) + ".orbax-checkpoint-tmp*")]:
    shutil.rmtree(p, ignore_errors=True)


def _save_failed(path: str, tmp: str, e: Exception) -> Exception:
  """The error of a failed model save (tmp already removed): names the model
  directory and says the previous one is intact (an OSError with the errno,
  TensorStore's too: `fileio.write_failed`)."""
  what = f"saving the model {os.path.abspath(path)} failed"
  kept = f"the previous model there (if any) is intact and the temporary {tmp} was removed"
  return write_failed(e, what, kept)


def _host_array(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def save_native(path: str, cfg: VLMConfig, params, tokenizer_model: str | None = None) -> None:
  """Writes the model at `path` (tmp sibling, then rename). With several JAX
  processes this is a collective: every process calls it, parameters sharded
  over processes are gathered, process 0 writes and the others wait for it."""
  params = {k: _host_array(v) for k, v in flatten(params).items()}
  if jax.process_count() == 1:
    _write_native(path, cfg, params, tokenizer_model)
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    _write_native(path, cfg, params, tokenizer_model)
  multihost_utils.sync_global_devices(f"auditdm save_native {os.path.abspath(path)}")


def _write_native(path: str, cfg: VLMConfig, params: dict[str, np.ndarray],
                  tokenizer_model: str | None) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  def write(tmp: str) -> None:
    me = jax.process_index()   # this process alone (the others are not saving)
    ckptr = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))
    ckptr.save(os.path.join(tmp, "params"), flax.traverse_util.unflatten_dict(params, sep="/"))
    ckptr.wait_until_finished()
    tok = None
    if tokenizer_model:
      tok = "tokenizer.model"
      shutil.copyfile(tokenizer_model, os.path.join(tmp, tok))
    meta = {"format": NATIVE_FORMAT, "config": cfg.to_dict(), "tokenizer": tok}
    atomic_write_text(os.path.join(tmp, NATIVE_MARKER), json.dumps(meta, indent=2))

  _save_dir_atomically(path, write)


def read_native(path: str) -> tuple[VLMConfig, dict[str, np.ndarray], str | None]:
  marker = os.path.join(path, NATIVE_MARKER)
  try:
    with open(marker) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"checkpoint {marker}: unreadable: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != NATIVE_FORMAT:
    raise CheckpointError(f"checkpoint {marker}: format is "
                          f"{meta.get('format') if isinstance(meta, dict) else meta!r}, "
                          f"expected {NATIVE_FORMAT!r}")
  try:
    cfg = VLMConfig.from_dict(meta.get("config"))
  except ValueError as e:
    raise CheckpointError(f"checkpoint {marker}: bad config: {e}") from e
  params_dir = os.path.join(path, "params")
  if not is_orbax_dir(params_dir):
    raise CheckpointError(f"checkpoint {path}: no Orbax params directory at {params_dir}")
  flat = _flatten_any(_restore(params_dir))
  tok = meta.get("tokenizer")
  tok_path = os.path.join(path, tok) if tok else None
  if tok_path and not os.path.exists(tok_path):
    raise CheckpointError(f"checkpoint {path}: tokenizer file {tok_path} is missing")
  return cfg, flat, tok_path


def params_from_native(flat: dict, cfg: VLMConfig, source: str) -> dict:
  """Our own params (position embeddings resampled if the resolution changed)."""
  if "img/pos_embedding" in flat and np.ndim(flat["img/pos_embedding"]) == 3:
    flat = dict(flat, **{"img/pos_embedding": resample_posemb(flat["img/pos_embedding"],
                                                               cfg.vision.grid)})
  return assemble(flat, cfg, source)
