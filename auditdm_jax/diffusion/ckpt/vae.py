"""FLUX autoencoder checkpoints: a diffusers `vae/` directory or Black Forest
Labs' `ae.safetensors` (the LDM names) into `vae.AutoencoderKL`'s parameter
tree. `_entries` lists every weight-carrying module once with its name in
both layouts (see `vae`'s docstring for the two naming schemes).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from auditdm_jax.diffusion.common import (CheckpointError, Taker, config_beside, read_json,
                                          read_tensors)
from auditdm_jax.diffusion.vae import (FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR, Autoencoder,
                                       AutoencoderConfig)
from auditdm_jax.utils import fileio

__all__ = ["params_from_diffusers", "params_from_bfl", "config_from_bfl", "load_autoencoder"]

_BFL_PREFIXES = ("", "vae.", "first_stage_model.")


class _Entry(NamedTuple):
  path: tuple[str, ...]   # where in our params tree
  diffusers: str          # module name in a diffusers state dict
  bfl: str                # module name in a BFL / LDM state dict
  kind: str               # "conv" | "norm" | "linear"
  shape: tuple[int, ...]  # torch weight shape (diffusers layout)


def _entries(cfg: AutoencoderConfig) -> list[_Entry]:
  """Every weight-carrying module of the model, with its names in both layouts."""
  out: list[_Entry] = []
  boc, n, lc = cfg.block_out_channels, len(cfg.block_out_channels), cfg.latent_channels

  def conv(path, d, b, cin, cout, k):
    out.append(_Entry(path, d, b, "conv", (cout, cin, k, k)))

  def norm(path, d, b, c):
    out.append(_Entry(path, d, b, "norm", (c,)))

  def resnet(path, d, b, cin, cout):
    norm(path + ("norm1",), f"{d}.norm1", f"{b}.norm1", cin)
    conv(path + ("conv1",), f"{d}.conv1", f"{b}.conv1", cin, cout, 3)
    norm(path + ("norm2",), f"{d}.norm2", f"{b}.norm2", cout)
    conv(path + ("conv2",), f"{d}.conv2", f"{b}.conv2", cout, cout, 3)
    if cin != cout:
      conv(path + ("conv_shortcut",), f"{d}.conv_shortcut", f"{b}.nin_shortcut", cin, cout, 1)

  def mid(path, d, b, c):
    resnet(path + ("resnets_0",), f"{d}.resnets.0", f"{b}.block_1", c, c)
    if cfg.mid_block_add_attention:
      a, da, ba = path + ("attention",), f"{d}.attentions.0", f"{b}.attn_1"
      norm(a + ("group_norm",), f"{da}.group_norm", f"{ba}.norm", c)
      for ours, dn, bn in (("to_q", "to_q", "q"), ("to_k", "to_k", "k"), ("to_v", "to_v", "v"),
                           ("to_out", "to_out.0", "proj_out")):
        out.append(_Entry(a + (ours,), f"{da}.{dn}", f"{ba}.{bn}", "linear", (c, c)))
    resnet(path + ("resnets_1",), f"{d}.resnets.1", f"{b}.block_2", c, c)

  e = ("encoder",)
  conv(e + ("conv_in",), "encoder.conv_in", "encoder.conv_in", cfg.in_channels, boc[0], 3)
  cin = boc[0]
  for i, ch in enumerate(boc):
    for j in range(cfg.layers_per_block):
      resnet(e + (f"down_blocks_{i}", f"resnets_{j}"), f"encoder.down_blocks.{i}.resnets.{j}",
             f"encoder.down.{i}.block.{j}", cin, ch)
      cin = ch
    if i < n - 1:
      conv(e + (f"down_blocks_{i}", "downsample"), f"encoder.down_blocks.{i}.downsamplers.0.conv",
           f"encoder.down.{i}.downsample.conv", ch, ch, 3)
  mid(e + ("mid_block",), "encoder.mid_block", "encoder.mid", boc[-1])
  norm(e + ("conv_norm_out",), "encoder.conv_norm_out", "encoder.norm_out", boc[-1])
  conv(e + ("conv_out",), "encoder.conv_out", "encoder.conv_out", boc[-1], 2 * lc, 3)
  if cfg.use_quant_conv:
    conv(("quant_conv",), "quant_conv", "quant_conv", 2 * lc, 2 * lc, 1)
  if cfg.use_post_quant_conv:
    conv(("post_quant_conv",), "post_quant_conv", "post_quant_conv", lc, lc, 1)
  d = ("decoder",)
  conv(d + ("conv_in",), "decoder.conv_in", "decoder.conv_in", lc, boc[-1], 3)
  mid(d + ("mid_block",), "decoder.mid_block", "decoder.mid", boc[-1])
  rev = boc[::-1]
  cin = rev[0]
  for i, ch in enumerate(rev):
    for j in range(cfg.layers_per_block + 1):
      resnet(d + (f"up_blocks_{i}", f"resnets_{j}"), f"decoder.up_blocks.{i}.resnets.{j}",
             f"decoder.up.{n - 1 - i}.block.{j}", cin, ch)
      cin = ch
    if i < n - 1:
      conv(d + (f"up_blocks_{i}", "upsample"), f"decoder.up_blocks.{i}.upsamplers.0.conv",
           f"decoder.up.{n - 1 - i}.upsample.conv", ch, ch, 3)
  norm(d + ("conv_norm_out",), "decoder.conv_norm_out", "decoder.norm_out", boc[0])
  conv(d + ("conv_out",), "decoder.conv_out", "decoder.conv_out", boc[0], cfg.out_channels, 3)
  return out


def _convert(tensors: Mapping[str, np.ndarray], cfg: AutoencoderConfig, source: str,
             layout: str, prefix: str = "") -> dict:
  take = Taker(tensors, source, cfg.dtype, prefix=prefix)
  params: dict = {}
  for ent in _entries(cfg):
    name = ent.diffusers if layout == "diffusers" else ent.bfl
    if ent.kind == "norm":
      leaf = {"scale": take.take(f"{name}.weight", ent.shape),
              "bias": take.take(f"{name}.bias", ent.shape[:1])}
    elif ent.kind == "conv":
      leaf = {"kernel": take.take(f"{name}.weight", ent.shape).transpose(2, 3, 1, 0),
              "bias": take.take(f"{name}.bias", ent.shape[:1])}
    else:   # linear; BFL stores the attention projections as 1x1 convs
      if layout == "diffusers":
        w = take.take(f"{name}.weight", ent.shape)
      else:
        w = take.take(f"{name}.weight", ent.shape + (1, 1))[:, :, 0, 0]
      leaf = {"kernel": w.T, "bias": take.take(f"{name}.bias", ent.shape[:1])}
    node = params
    for part in ent.path[:-1]:
      node = node.setdefault(part, {})
    node[ent.path[-1]] = {k: np.ascontiguousarray(v) for k, v in leaf.items()}
  take.finish()
  return params


def params_from_diffusers(tensors: Mapping[str, np.ndarray], cfg: AutoencoderConfig,
                          source: str = "vae") -> dict:
  """Our params tree (numpy, `cfg.dtype`) from a diffusers AutoencoderKL state
  dict; every missing / unknown / wrong-shape key is a CheckpointError naming
  `source`, the key and the shapes."""
  return _convert(tensors, cfg, source, "diffusers")


def _bfl_prefix(tensors: Mapping[str, np.ndarray]) -> str:
  """'' for BFL's ae.safetensors; 'vae.' / 'first_stage_model.' when the
  autoencoder sits inside a bigger LDM-style checkpoint."""
  for p in _BFL_PREFIXES:
    if f"{p}encoder.conv_in.weight" in tensors:
      return p
  return ""


def params_from_bfl(tensors: Mapping[str, np.ndarray], cfg: AutoencoderConfig,
                    source: str = "ae.safetensors") -> dict:
  """Our params tree from Black Forest Labs' `ae.safetensors` names (the LDM
  layout, optionally under a 'vae.' / 'first_stage_model.' prefix)."""
  return _convert(tensors, cfg, source, "bfl", prefix=_bfl_prefix(tensors))


def config_from_bfl(tensors: Mapping[str, np.ndarray], dtype: str = "bfloat16",
                    norm_num_groups: int = 32, source: str = "ae.safetensors") -> AutoencoderConfig:
  """The config of a BFL / LDM autoencoder state dict, read off its shapes,
  with FLUX.1's scaling / shift factors. The group count is not in the
  shapes: BFL's code fixes it at 32 (`norm_num_groups`)."""
  p = _bfl_prefix(tensors)

  def shape(key):
    if p + key not in tensors:
      raise CheckpointError(f"checkpoint {source}: missing key {p + key!r}, needed to infer "
                            f"the autoencoder config")
    return tuple(np.shape(tensors[p + key]))

  def rank4(key):
    s = shape(key)
    if len(s) != 4:
      raise CheckpointError(f"checkpoint {source}: key {p + key!r} has shape {s}; a conv weight "
                            f"[out, in, kh, kw] is expected")
    return s

  in_channels = rank4("encoder.conv_in.weight")[1]
  boc = []
  while p + f"encoder.down.{len(boc)}.block.0.conv1.weight" in tensors:
    boc.append(rank4(f"encoder.down.{len(boc)}.block.0.conv1.weight")[0])
  if not boc:
    shape("encoder.down.0.block.0.conv1.weight")   # raises, naming the key
  layers = 0
  while p + f"encoder.down.0.block.{layers}.conv1.weight" in tensors:
    layers += 1
  conv_out = rank4("encoder.conv_out.weight")[0]
  if conv_out % 2:
    raise CheckpointError(f"checkpoint {source}: key {p + 'encoder.conv_out.weight'!r} has "
                          f"{conv_out} output channels; 2 x latent channels (mean, logvar) "
                          f"expected")
  try:
    return AutoencoderConfig(
        in_channels=in_channels, out_channels=rank4("decoder.conv_out.weight")[0],
        block_out_channels=tuple(boc), layers_per_block=layers, latent_channels=conv_out // 2,
        norm_num_groups=norm_num_groups, scaling_factor=FLUX_SCALING_FACTOR,
        shift_factor=FLUX_SHIFT_FACTOR, use_quant_conv=p + "quant_conv.weight" in tensors,
        use_post_quant_conv=p + "post_quant_conv.weight" in tensors,
        mid_block_add_attention=p + "encoder.mid.attn_1.q.weight" in tensors, dtype=str(dtype))
  except ValueError as e:
    raise CheckpointError(f"checkpoint {source}: inferred config is invalid: {e}") from e


def _layout_of(tensors: Mapping[str, np.ndarray], source: str) -> str:
  keys = list(tensors)
  if any(".down_blocks." in k or ".mid_block." in k or ".up_blocks." in k for k in keys):
    return "diffusers"
  p = _bfl_prefix(tensors)
  if any(k.startswith((p + "encoder.down.", p + "encoder.mid.", p + "decoder.up."))
         for k in keys):
    return "bfl"
  shown = ", ".join(repr(k) for k in sorted(keys)[:5])
  raise CheckpointError(f"checkpoint {source}: neither a diffusers AutoencoderKL nor a BFL "
                        f"autoencoder state dict (first keys: {shown or 'none'})")


def load_autoencoder(path: str, dtype: str = "bfloat16",
                     config: AutoencoderConfig | None = None) -> Autoencoder:
  """An Autoencoder from a diffusers `vae/` directory (config.json +
  diffusion_pytorch_model.safetensors), a BFL `ae.safetensors` file, or a
  directory holding `ae.safetensors`; the layout is told by the tensor names.
  `config` (optional) replaces the config read / inferred (its dtype is
  replaced by `dtype`); shapes are checked against it either way."""
  path = os.fspath(path)
  in_dir = not path.endswith(".safetensors")
  if in_dir:
    cfg_path = fileio.join(path, "config.json")
    single = fileio.join(path, "diffusion_pytorch_model.safetensors")
    ae = fileio.join(path, "ae.safetensors")
    if fileio.exists(cfg_path):
      weights = single if fileio.exists(single) else path
    elif fileio.exists(ae):
      weights = ae
    elif fileio.exists(path):
      raise CheckpointError(f"checkpoint {path}: a directory with neither config.json (diffusers "
                            f"vae/) nor ae.safetensors (BFL)")
    else:
      raise CheckpointError(f"checkpoint {path}: no such file or directory")
  else:
    weights = path
    cfg_path = config_beside(path)
  tensors = read_tensors(weights)
  layout = _layout_of(tensors, weights)
  if config is not None:
    cfg = dataclasses.replace(config, dtype=str(dtype))
  elif layout == "diffusers" or (in_dir and fileio.exists(cfg_path)):
    if not fileio.exists(cfg_path):
      raise CheckpointError(f"checkpoint {weights}: diffusers-layout tensors but no config.json "
                            f"beside them ({cfg_path})")
    try:
      cfg = AutoencoderConfig.from_diffusers(read_json(cfg_path), dtype=dtype)
    except CheckpointError:
      raise
    except ValueError as e:
      raise CheckpointError(f"checkpoint {cfg_path}: {e}") from e
  else:
    cfg = config_from_bfl(tensors, dtype=dtype, source=weights)
  convert = params_from_diffusers if layout == "diffusers" else params_from_bfl
  return Autoencoder(cfg, convert(tensors, cfg, weights))
