"""FLUX transformer checkpoints: diffusers' `transformer/` directory and Black
Forest Labs' single files (flux1-dev / flux1-kontext-dev .safetensors) into
`flux.FluxTransformer`'s parameter tree.

One mapping serves both: `_Layout` names, for each of our modules, the
checkpoint module it comes from (`DIFFUSERS`, `BFL`); the shapes of our
modules are written once (`_double_shapes`, `_single_shapes`). BFL fuses
q, k, v (and the single blocks' MLP input) into one Linear, split here, and
stores the final adaLN as (shift, scale), swapped here into diffusers'
(scale, shift).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import numpy as np

from auditdm_jax.diffusion.common import (CheckpointError, Taker, config_beside, dtype_name,
                                          read_json, read_tensors)
from auditdm_jax.diffusion.flux import KNOWN_AXES, TIME_PROJ_DIM, FluxConfig, Transformer
from auditdm_jax.utils import fileio

__all__ = ["params_from_diffusers", "params_from_bfl", "config_from_bfl", "load_transformer"]

_BFL_PREFIX = "model.diffusion_model."


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where each of our modules sits in one checkpoint layout."""

  top: dict[str, str]            # our top-level Linear -> checkpoint module
  embedders: dict[str, str]      # our time_text_embed MLP -> checkpoint module
  embedder_layers: tuple[str, str]   # its two Linears (our linear_1, linear_2)
  double: str                    # double-stream block prefix
  single: str                    # single-stream block prefix
  norm_weight: str               # the RMS norms' parameter name
  double_linear: dict[str, str]
  double_norms: dict[str, str]
  single_linear: dict[str, str]
  single_norms: dict[str, str]
  double_fused: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  single_fused: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  norm_out_swapped: bool = False   # the final adaLN stores (shift, scale)


_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

DIFFUSERS = _Layout(
    top={"x_embedder": "x_embedder", "context_embedder": "context_embedder",
         "norm_out": "norm_out.linear", "proj_out": "proj_out"},
    embedders={"timestep_embedder": "time_text_embed.timestep_embedder",
               "text_embedder": "time_text_embed.text_embedder",
               "guidance_embedder": "time_text_embed.guidance_embedder"},
    embedder_layers=("linear_1", "linear_2"),
    double="transformer_blocks", single="single_transformer_blocks", norm_weight="weight",
    double_linear={"norm1": "norm1.linear", "norm1_context": "norm1_context.linear",
                   "to_out": "attn.to_out.0", "to_add_out": "attn.to_add_out",
                   "ff_in": "ff.net.0.proj", "ff_out": "ff.net.2",
                   "ff_context_in": "ff_context.net.0.proj", "ff_context_out": "ff_context.net.2",
                   **{nm: "attn." + nm for nm in _QKV + _ADD_QKV}},
    double_norms={nm: "attn." + nm for nm in ("norm_q", "norm_k", "norm_added_q",
                                               "norm_added_k")},
    single_linear={"norm": "norm.linear", "proj_mlp": "proj_mlp", "proj_out": "proj_out",
                   **{nm: "attn." + nm for nm in _QKV}},
    single_norms={"norm_q": "attn.norm_q", "norm_k": "attn.norm_k"})

BFL = _Layout(
    top={"x_embedder": "img_in", "context_embedder": "txt_in",
         "norm_out": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"},
    embedders={"timestep_embedder": "time_in", "text_embedder": "vector_in",
               "guidance_embedder": "guidance_in"},
    embedder_layers=("in_layer", "out_layer"),
    double="double_blocks", single="single_blocks", norm_weight="scale",
    double_linear={"norm1": "img_mod.lin", "norm1_context": "txt_mod.lin",
                   "to_out": "img_attn.proj", "to_add_out": "txt_attn.proj",
                   "ff_in": "img_mlp.0", "ff_out": "img_mlp.2",
                   "ff_context_in": "txt_mlp.0", "ff_context_out": "txt_mlp.2"},
    double_norms={"norm_q": "img_attn.norm.query_norm", "norm_k": "img_attn.norm.key_norm",
                  "norm_added_q": "txt_attn.norm.query_norm",
                  "norm_added_k": "txt_attn.norm.key_norm"},
    double_fused={"img_attn.qkv": _QKV, "txt_attn.qkv": _ADD_QKV},
    single_linear={"norm": "modulation.lin", "proj_out": "linear2"},
    single_norms={"norm_q": "norm.query_norm", "norm_k": "norm.key_norm"},
    single_fused={"linear1": _QKV + ("proj_mlp",)},
    norm_out_swapped=True)


def _double_shapes(d: int, m: int) -> dict[str, tuple[int, int]]:
  """Torch (out, in) of every Linear of a double-stream block."""
  return {"norm1": (6 * d, d), "norm1_context": (6 * d, d), "to_out": (d, d),
          "to_add_out": (d, d), "ff_in": (m, d), "ff_out": (d, m), "ff_context_in": (m, d),
          "ff_context_out": (d, m), **{nm: (d, d) for nm in _QKV + _ADD_QKV}}


def _single_shapes(d: int, m: int) -> dict[str, tuple[int, int]]:
  """Torch (out, in) of every Linear of a single-stream block."""
  return {"norm": (3 * d, d), "proj_mlp": (m, d), "proj_out": (d, d + m),
          **{nm: (d, d) for nm in _QKV}}


def _stack(layers: list[dict]) -> dict:
  return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def _linear(kernel_oi: np.ndarray, bias: np.ndarray) -> dict:
  """A torch Linear (weight [out, in], bias [out]) as {kernel [in, out], bias}."""
  return {"kernel": np.ascontiguousarray(kernel_oi.T), "bias": bias}


class _Reader:
  """Our modules out of one layout's tensors, through a Taker."""

  def __init__(self, take: Taker, layout: _Layout, cfg: FluxConfig):
    self.take, self.layout, self.head_dim = take, layout, cfg.head_dim

  def wb(self, key, out, inp):
    return self.take.take(key + ".weight", (out, inp)), self.take.take(key + ".bias", (out,))

  def lin(self, key, out, inp):
    return _linear(*self.wb(key, out, inp))

  def norm(self, key):
    return {"scale": self.take.take(f"{key}.{self.layout.norm_weight}", (self.head_dim,))}

  def block(self, prefix, linear, norms, fused, shapes):
    """One block: its Linears, its RMS norms, then its fused Linears split."""
    blk = {ours: self.lin(prefix + key, *shapes[ours]) for ours, key in linear.items()}
    blk.update({ours: self.norm(prefix + key) for ours, key in norms.items()})
    for key, names in fused.items():
      sizes = [shapes[nm][0] for nm in names]
      w, b = self.wb(prefix + key, sum(sizes), shapes[names[0]][1])
      cuts = np.cumsum(sizes)[:-1]
      blk.update({nm: _linear(wi, bi) for nm, wi, bi in
                  zip(names, np.split(w, cuts, axis=0), np.split(b, cuts, axis=0))})
    return blk


def _params(tensors: Mapping[str, np.ndarray], cfg: FluxConfig, source: str,
            layout: _Layout, prefix: str = "") -> dict:
  take = Taker(tensors, source, dtype=cfg.dtype, prefix=prefix)
  read = _Reader(take, layout, cfg)
  d, m, lay = cfg.width, cfg.mlp_dim, layout
  one, two = lay.embedder_layers
  inputs = {"timestep_embedder": TIME_PROJ_DIM, "text_embedder": cfg.pooled_projection_dim}
  if cfg.guidance_embeds:
    inputs["guidance_embedder"] = TIME_PROJ_DIM
  tte = {ours: {"linear_1": read.lin(f"{lay.embedders[ours]}.{one}", d, inp),
                "linear_2": read.lin(f"{lay.embedders[ours]}.{two}", d, d)}
         for ours, inp in inputs.items()}
  params = {"x_embedder": read.lin(lay.top["x_embedder"], d, cfg.in_channels),
            "context_embedder": read.lin(lay.top["context_embedder"], d, cfg.joint_attention_dim),
            "time_text_embed": tte}
  double = [read.block(f"{lay.double}.{i}.", lay.double_linear, lay.double_norms,
                       lay.double_fused, _double_shapes(d, m)) for i in range(cfg.num_layers)]
  single = [read.block(f"{lay.single}.{i}.", lay.single_linear, lay.single_norms,
                       lay.single_fused, _single_shapes(d, m))
            for i in range(cfg.num_single_layers)]
  w, b = read.wb(lay.top["norm_out"], 2 * d, d)
  if lay.norm_out_swapped:
    w, b = np.concatenate([w[d:], w[:d]]), np.concatenate([b[d:], b[:d]])
  params["norm_out"] = _linear(w, b)
  params["proj_out"] = read.lin(lay.top["proj_out"], cfg.out, d)
  take.finish()
  if double:
    params["transformer_blocks"] = _stack(double)
  if single:
    params["single_transformer_blocks"] = _stack(single)
  return params


def params_from_diffusers(tensors: Mapping[str, np.ndarray], cfg: FluxConfig,
                          source: str = "diffusers transformer") -> dict:
  """Parameters from a diffusers FluxTransformer2DModel state dict (names as
  in `diffusion_pytorch_model*.safetensors`); shapes checked against cfg, every
  problem (missing / wrong-shape / unknown key) reported at once."""
  return _params(tensors, cfg, source, DIFFUSERS)


def _bfl_prefix(tensors: Mapping[str, np.ndarray]) -> str:
  return _BFL_PREFIX if _BFL_PREFIX + "img_in.weight" in tensors else ""


def params_from_bfl(tensors: Mapping[str, np.ndarray], cfg: FluxConfig,
                    source: str = "BFL checkpoint") -> dict:
  """Parameters from a Black Forest Labs single-file state dict
  (flux1-dev.safetensors / flux1-kontext-dev.safetensors; keys may carry a
  'model.diffusion_model.' prefix). Fused qkv [3D, D] and linear1 [3D + M, D]
  are split into q, k, v (, mlp); final_layer.adaLN_modulation.1 is
  (shift, scale) and is swapped into diffusers' (scale, shift)."""
  return _params(tensors, cfg, source, BFL, prefix=_bfl_prefix(tensors))


def config_from_bfl(tensors: Mapping[str, np.ndarray], dtype: str = "bfloat16", *,
                    axes_dims_rope: tuple[int, ...] | None = None,
                    source: str = "BFL checkpoint") -> FluxConfig:
  """FluxConfig inferred from a BFL state dict's shapes: widths from img_in /
  txt_in / vector_in / final_layer, head_dim from the q-norm scale (128 in the
  published models), block counts from the highest block index, mlp_ratio
  from the MLP width, guidance_embeds from the presence of guidance_in.
  axes_dims_rope is not stored in the file: (16, 56, 56) for head_dim 128
  (the published models), else it must be given."""
  pre = _bfl_prefix(tensors)

  def shape(key):
    if pre + key not in tensors:
      raise CheckpointError(f"checkpoint {source}: missing key {pre + key!r}, needed to infer "
                            "the transformer config")
    return tuple(np.shape(tensors[pre + key]))

  def count(block):
    pat = re.compile(re.escape(pre + block) + r"\.(\d+)\.")
    idx = [int(mt.group(1)) for k in tensors if (mt := pat.match(k))]
    return max(idx) + 1 if idx else 0

  width, in_channels = shape("img_in.weight")
  _, joint = shape("txt_in.weight")
  _, pooled = shape("vector_in.in_layer.weight")
  out, _ = shape("final_layer.linear.weight")
  num_layers, num_single = count("double_blocks"), count("single_blocks")
  if num_layers:
    (head_dim,) = shape("double_blocks.0.img_attn.norm.query_norm.scale")
    mlp, _ = shape("double_blocks.0.img_mlp.0.weight")
  elif num_single:
    (head_dim,) = shape("single_blocks.0.norm.query_norm.scale")
    mlp = shape("single_blocks.0.linear1.weight")[0] - 3 * width
  else:
    raise CheckpointError(f"checkpoint {source}: no double_blocks.* or single_blocks.* keys")
  if width % head_dim:
    raise CheckpointError(f"checkpoint {source}: width {width} (img_in.weight) is not a "
                          f"multiple of head_dim {head_dim} (query_norm.scale)")
  if axes_dims_rope is None:
    if head_dim not in KNOWN_AXES:
      raise CheckpointError(f"checkpoint {source}: head_dim {head_dim} is not that of a "
                            "published FLUX.1 model (128); pass axes_dims_rope explicitly")
    axes_dims_rope = KNOWN_AXES[head_dim]
  try:
    return FluxConfig(in_channels=in_channels, out_channels=None if out == in_channels else out,
                      num_layers=num_layers, num_single_layers=num_single,
                      num_heads=width // head_dim, head_dim=head_dim, joint_attention_dim=joint,
                      pooled_projection_dim=pooled,
                      guidance_embeds=pre + "guidance_in.in_layer.weight" in tensors,
                      axes_dims_rope=tuple(axes_dims_rope), mlp_ratio=mlp / width,
                      dtype=dtype_name(dtype))
  except ValueError as e:
    raise CheckpointError(f"checkpoint {source}: {e}") from e


def load_transformer(path: str, dtype: str = "bfloat16", *,
                     axes_dims_rope: tuple[int, ...] | None = None) -> Transformer:
  """A Transformer from a diffusers `transformer/` directory (config.json +
  diffusion_pytorch_model*.safetensors, sharded or not) or a BFL single
  .safetensors file (told apart by their keys). `axes_dims_rope` overrides
  the config's (a BFL file of a non-published head dim needs it)."""
  dtype = dtype_name(dtype)
  tensors = read_tensors(path)
  if "img_in.weight" in tensors or _BFL_PREFIX + "img_in.weight" in tensors:
    cfg = config_from_bfl(tensors, dtype, axes_dims_rope=axes_dims_rope, source=str(path))
    return Transformer(cfg, params_from_bfl(tensors, cfg, str(path)))
  if "x_embedder.weight" not in tensors:
    raise CheckpointError(f"checkpoint {path}: neither a diffusers FluxTransformer2DModel "
                          "(no 'x_embedder.weight') nor a Black Forest Labs FLUX file "
                          "(no 'img_in.weight')")
  cpath = config_beside(path)
  if not fileio.exists(cpath):
    raise CheckpointError(f"checkpoint {path}: diffusers transformer weights without "
                          f"{cpath}")
  try:
    cfg = FluxConfig.from_diffusers(read_json(cpath), dtype)
    if axes_dims_rope is not None:
      cfg = dataclasses.replace(cfg, axes_dims_rope=tuple(axes_dims_rope))
  except CheckpointError:
    raise
  except ValueError as e:
    raise CheckpointError(f"checkpoint {cpath}: {e}") from e
  return Transformer(cfg, params_from_diffusers(tensors, cfg, str(path)))
