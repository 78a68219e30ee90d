"""The FLUX autoencoder (`auditdm_jax.diffusion.vae`) against diffusers'
AutoencoderKL: tiny random models (`tests.flux_reference.vae()`, 2 levels,
4 latent channels, 4 groups), float32 on CPU, max abs difference <= 1e-4 for
the latent mean and the decoded images; loading from `save_pretrained` and
from a Black Forest Labs-layout `ae.safetensors`; bfloat16 near float32; and
the errors for malformed checkpoints and inputs.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from auditdm_jax.diffusion.ckpt import vae as ae_ckpt
from auditdm_jax.diffusion.ckpt.vae import (config_from_bfl, load_autoencoder, params_from_bfl,
                                            params_from_diffusers)
from auditdm_jax.diffusion.vae import FLUX1_AE, Autoencoder, AutoencoderConfig
from auditdm_jax.diffusion.common import CheckpointError
from tests import flux_reference as ref

from auditdm_jax.diffusion import vae as ae_lib

TOL = 1e-4
SIZES = [(16, 24), (32, 32)]


def _sd(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _images(h, w, b=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (b, 3, h, w)).astype(np.float32)


def _latents(model, h, w, b=2, seed=1):
  f = 2 ** (len(model.config.block_out_channels) - 1)
  c = model.config.latent_channels
  return np.random.default_rng(seed).standard_normal((b, c, h // f, w // f)).astype(np.float32)


def _ref_encode(model, x):
  with torch.no_grad():
    return model.encode(torch.from_numpy(x)).latent_dist.mean.numpy()


def _ref_decode(model, z):
  with torch.no_grad():
    return model.decode(torch.from_numpy(z)).sample.numpy()


def _err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _check_parity(model, ours, sizes, label):
  for h, w in sizes:
    x = _images(h, w)
    z = _latents(model, h, w)
    e_enc = _err(ours.encode(x), _ref_encode(model, x))
    e_dec = _err(ours.decode(z), _ref_decode(model, z))
    print(f"[vae parity] {label} {h}x{w}: encode mean max|d| {e_enc:.2e}, "
          f"decode max|d| {e_dec:.2e}")
    assert e_enc <= TOL and e_dec <= TOL, (label, h, w, e_enc, e_dec)


def to_bfl(sd: dict[str, np.ndarray], levels: int) -> dict[str, np.ndarray]:
  """Our own inverse of diffusers' `convert_ldm_vae_checkpoint`: a diffusers
  AutoencoderKL state dict renamed into BFL's ae.safetensors layout."""
  out = {}
  for k, v in sd.items():
    b = k
    b = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", b)
    b = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv",
               r"encoder.down.\1.downsample.conv", b)
    b = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}", b)
    b = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv", b)
    b = b.replace("mid_block.resnets.0", "mid.block_1")
    b = b.replace("mid_block.resnets.1", "mid.block_2")
    b = b.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if "mid_block.attentions.0." in b:
      b = b.replace("mid_block.attentions.0.", "mid.attn_1.")
      b = (b.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
           .replace("to_v.", "v.").replace("to_out.0.", "proj_out."))
      if b.endswith(".weight") and v.ndim == 2:
        v = v[:, :, None, None]            # BFL: 1x1 convs
    assert b not in out, b
    out[b] = np.ascontiguousarray(v)
  return out


# ----------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(diffusers model, its save_pretrained dir, ours loaded float32 from it)."""
  model = ref.vae(seed=0)
  path = tmp_path_factory.mktemp("vae")
  model.save_pretrained(path)
  return model, str(path), load_autoencoder(str(path), dtype="float32")


# ----------------------------------------------------------------------------
# Config.


def test_flux_config_facts():
  c = FLUX1_AE
  assert c.block_out_channels == (128, 256, 512, 512) and c.layers_per_block == 2
  assert c.latent_channels == 16 and c.norm_num_groups == 32 and c.scale_factor == 8
  assert c.scaling_factor == 0.3611 and c.shift_factor == 0.1159
  assert not c.use_quant_conv and not c.use_post_quant_conv and c.dtype == "bfloat16"
  # FLUX.1-dev's vae/config.json
  flux = dict(_class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
              down_block_types=["DownEncoderBlock2D"] * 4, force_upcast=True, in_channels=3,
              latent_channels=16, latents_mean=None, latents_std=None, layers_per_block=2,
              mid_block_add_attention=True, norm_num_groups=32, out_channels=3, sample_size=1024,
              scaling_factor=0.3611, shift_factor=0.1159, up_block_types=["UpDecoderBlock2D"] * 4,
              use_post_quant_conv=False, use_quant_conv=False)
  assert AutoencoderConfig.from_diffusers(flux) == FLUX1_AE


def test_config_from_diffusers_tiny(tiny):
  model, _, ours = tiny
  c = ours.cfg
  assert c == AutoencoderConfig.from_diffusers(dict(model.config), dtype="float32")
  assert c.block_out_channels == (8, 16) and c.latent_channels == 4 and c.norm_num_groups == 4
  assert c.scale_factor == 2 and c.scaling_factor == 1.5035 and c.shift_factor == 0.0609


@pytest.mark.parametrize("field,value,needle", [
    ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"], "down_block_types"),
    ("up_block_types", ["UpDecoderBlock2D"], "up_block_types"),
    ("act_fn", "gelu", "act_fn"),
    ("latents_mean", [0.0] * 4, "latents_mean"),
    ("norm_num_groups", 3, "norm_num_groups"),
    ("layers_per_block", 0, "layers_per_block"),
    ("latent_channels", "4", "latent_channels"),
    ("scaling_factor", 0, "scaling_factor"),
    ("_class_name", "AutoencoderTiny", "_class_name"),
    ("block_out_channels", 8, "block_out_channels"),
])
def test_config_from_diffusers_errors(field, value, needle):
  d = {**ref.VAE, field: value}
  with pytest.raises(ValueError, match=needle):
    AutoencoderConfig.from_diffusers(d)


def test_config_dtype_error():
  with pytest.raises(ValueError, match="dtype"):
    AutoencoderConfig(dtype="int8")


# ----------------------------------------------------------------------------
# Parity.


def test_parity_float32(tiny):
  model, _, ours = tiny
  assert ours.params["encoder"]["conv_in"]["kernel"].dtype == jnp.float32
  _check_parity(model, ours, SIZES, "tiny")


def test_latents_scaling_pipeline_formula(tiny):
  model, _, ours = tiny
  x = _images(16, 24)
  want = (_ref_encode(model, x) - model.config.shift_factor) * model.config.scaling_factor
  got = ours.to_latents(x)
  print(f"[vae parity] to_latents max|d| {_err(got, want):.2e}")
  assert got.shape == (2, 4, 8, 12) and _err(got, want) <= TOL
  lat = _latents(model, 16, 24)
  want = _ref_decode(model, lat / model.config.scaling_factor + model.config.shift_factor)
  got = ours.from_latents(lat)
  print(f"[vae parity] from_latents max|d| {_err(got, want):.2e}")
  assert got.shape == (2, 3, 16, 24) and _err(got, want) <= TOL


@pytest.mark.parametrize("overrides", [
    dict(use_quant_conv=True, use_post_quant_conv=True),
    dict(mid_block_add_attention=False, layers_per_block=2),
], ids=["quant_conv", "no_attention"])
def test_parity_variants(overrides):
  model = ref.vae(seed=3, **overrides)
  cfg = AutoencoderConfig.from_diffusers(dict(model.config), dtype="float32")
  for k, v in overrides.items():
    assert getattr(cfg, k) == v
  ours = Autoencoder(cfg, params_from_diffusers(_sd(model), cfg, "variant"))
  if cfg.use_quant_conv:
    assert "quant_conv" in ours.params and "post_quant_conv" in ours.params
  _check_parity(model, ours, SIZES[:1], "+".join(overrides))


def test_jit_cache_once_per_size(tiny):
  model, path, _ = tiny
  ours = load_autoencoder(path, dtype="float32")
  for _ in range(2):
    ours.encode(_images(16, 24))
    ours.decode(_latents(model, 16, 24))
  assert ours.traces == {"encode": 1, "decode": 1}
  ours.encode(_images(32, 32))
  assert ours.traces == {"encode": 2, "decode": 1}


def test_functional_api_jittable(tiny):
  model, _, ours = tiny
  cfg = ours.cfg
  enc = jax.jit(ae_lib.encode, static_argnums=1)
  dec = jax.jit(ae_lib.decode, static_argnums=1)
  x = _images(16, 24)
  mean = enc(ours.params, cfg, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert mean.shape == (2, 8, 12, 4) and mean.dtype == jnp.float32
  assert _err(np.asarray(mean).transpose(0, 3, 1, 2), _ref_encode(model, x)) <= TOL
  img = dec(ours.params, cfg, mean)
  assert img.shape == (2, 16, 24, 3)
  fresh = ae_lib.init_params(cfg, jax.random.PRNGKey(0))
  assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(ours.params)
  for a, b in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(ours.params)):
    assert a.shape == b.shape and a.dtype == b.dtype


def test_bfloat16_close_to_float32(tiny):
  model, path, ours32 = tiny
  ours16 = load_autoencoder(path)              # default dtype bfloat16
  assert ours16.cfg.dtype == "bfloat16"
  assert ours16.params["encoder"]["conv_in"]["kernel"].dtype == jnp.bfloat16
  x = _images(16, 24)
  z = _latents(model, 16, 24)
  m32, m16 = ours32.encode(x), ours16.encode(x)
  d32, d16 = ours32.decode(z), ours16.decode(z)
  assert m16.dtype == np.float32 and d16.dtype == np.float32
  e_enc = _err(m16, m32) / np.max(np.abs(m32))
  e_dec = _err(d16, d32) / np.max(np.abs(d32))
  print(f"[vae bf16] relative max|d| encode {e_enc:.2e}, decode {e_dec:.2e}")
  assert e_enc < 0.05 and e_dec < 0.05


# ----------------------------------------------------------------------------
# BFL layout.


def test_bfl_inverse_mapping_matches_diffusers_converter():
  """Our test-side renaming is exactly inverted by diffusers' own converter."""
  from diffusers.loaders.single_file_utils import \
      convert_ldm_vae_checkpoint  # pylint: disable=import-outside-toplevel
  for overrides in ({}, dict(use_quant_conv=True, use_post_quant_conv=True)):
    model = ref.vae(seed=0, **overrides)
    sd = _sd(model)
    back = convert_ldm_vae_checkpoint(to_bfl(sd, 2), dict(model.config))
    assert set(back) == set(sd)
    for k in sd:
      np.testing.assert_array_equal(np.asarray(back[k]), sd[k], err_msg=k)


def test_bfl_params_equal_diffusers_params(tiny):
  model, _, ours = tiny
  bfl = to_bfl(_sd(model), 2)
  cfg = ours.cfg
  got = params_from_bfl(bfl, cfg, "ae")
  prefixed = params_from_bfl({f"first_stage_model.{k}": v for k, v in bfl.items()}, cfg, "ldm")
  for tree in (got, prefixed):
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(ours.params)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(ours.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  inferred = config_from_bfl(bfl, dtype="float32", norm_num_groups=4)
  assert inferred.block_out_channels == cfg.block_out_channels
  assert inferred.layers_per_block == 1 and inferred.latent_channels == 4
  assert inferred.scaling_factor == 0.3611 and inferred.shift_factor == 0.1159
  assert not inferred.use_quant_conv and inferred.mid_block_add_attention


def test_load_bfl_file(tmp_path):
  """A BFL ae.safetensors (32 groups, as BFL's code fixes) through
  load_autoencoder(file), the config read off the shapes."""
  model = ref.vae(seed=5, block_out_channels=(32, 64), norm_num_groups=32)
  path = str(tmp_path / "ae.safetensors")
  save_file(to_bfl(_sd(model), 2), path)
  ours = load_autoencoder(path, dtype="float32")
  assert ours.cfg.block_out_channels == (32, 64) and ours.cfg.norm_num_groups == 32
  assert ours.cfg.shift_factor == 0.1159 and ours.cfg.scaling_factor == 0.3611
  _check_parity(model, ours, SIZES[:1], "bfl file")
  # the directory holding ae.safetensors loads the same
  again = load_autoencoder(str(tmp_path), dtype="float32")
  assert again.cfg == ours.cfg


def test_load_bfl_file_with_config(tmp_path, tiny):
  model, _, ours = tiny
  path = str(tmp_path / "ae.safetensors")
  save_file(to_bfl(_sd(model), 2), path)
  with pytest.raises(CheckpointError, match="norm_num_groups 32"):
    load_autoencoder(path)          # 8 channels cannot take BFL's 32 groups
  got = load_autoencoder(path, dtype="float32", config=ours.cfg)
  x = _images(16, 24)
  assert _err(got.encode(x), _ref_encode(model, x)) <= TOL


# ----------------------------------------------------------------------------
# Checkpoint errors.


def _save_dir(tmp_path, model, sd):
  d = tmp_path / "vae"
  d.mkdir()
  with open(d / "config.json", "w") as f:
    json.dump(dict(model.config), f)
  save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
  return str(d)


def test_checkpoint_errors_name_keys_and_shapes(tmp_path, tiny):
  model = tiny[0]
  sd = _sd(model)
  sd["encoder.extra.weight"] = np.zeros((2,), np.float32)
  del sd["decoder.up_blocks.1.resnets.0.norm1.bias"]
  sd["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
  path = _save_dir(tmp_path, model, sd)
  with pytest.raises(CheckpointError) as e:
    load_autoencoder(path, dtype="float32")
  msg = str(e.value)
  assert "unknown key 'encoder.extra.weight'" in msg
  assert "missing key 'decoder.up_blocks.1.resnets.0.norm1.bias'" in msg
  assert "'encoder.conv_in.weight' has shape (8, 3, 5, 5)" in msg and "(8, 3, 3, 3)" in msg
  assert "diffusion_pytorch_model.safetensors" in msg


def test_bfl_errors(tiny):
  model, _, ours = tiny
  bfl = to_bfl(_sd(model), 2)
  bad = dict(bfl)
  bad["encoder.mid.attn_1.q.weight"] = bad["encoder.mid.attn_1.q.weight"][:, :, 0, 0]
  del bad["decoder.up.0.block.1.conv2.bias"]
  with pytest.raises(CheckpointError) as e:
    params_from_bfl(bad, ours.cfg, "ae.safetensors")
  msg = str(e.value)
  assert "'encoder.mid.attn_1.q.weight' has shape (16, 16)" in msg and "(16, 16, 1, 1)" in msg
  assert "missing key 'decoder.up.0.block.1.conv2.bias'" in msg
  with pytest.raises(CheckpointError, match="encoder.conv_in.weight"):
    config_from_bfl({k: v for k, v in bfl.items() if k != "encoder.conv_in.weight"})


def test_load_errors(tmp_path, tiny):
  model = tiny[0]
  with pytest.raises(CheckpointError, match="no such file"):
    load_autoencoder(str(tmp_path / "nowhere"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(CheckpointError, match="neither config.json"):
    load_autoencoder(str(empty))
  lone = tmp_path / "lone"
  lone.mkdir()
  save_file(_sd(model), str(lone / "model.safetensors"))
  with pytest.raises(CheckpointError, match="no config.json"):
    load_autoencoder(str(lone / "model.safetensors"))
  other = tmp_path / "other.safetensors"
  save_file({"text_model.weight": np.zeros((2, 2), np.float32)}, str(other))
  with pytest.raises(CheckpointError, match="neither a diffusers"):
    load_autoencoder(str(other))
  bad_cfg = tmp_path / "badcfg"
  bad_cfg.mkdir()
  with open(bad_cfg / "config.json", "w") as f:
    json.dump({**dict(model.config), "act_fn": "relu"}, f)
  save_file(_sd(model), str(bad_cfg / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(CheckpointError, match=r"config.json.*act_fn"):
    load_autoencoder(str(bad_cfg))


# ----------------------------------------------------------------------------
# Input errors.


def test_input_errors(tiny):
  _, _, ours = tiny
  with pytest.raises(ValueError, match="height 17 .* scale factor 2"):
    ours.encode(np.zeros((1, 3, 17, 24), np.float32))
  with pytest.raises(ValueError, match="width 25 .* scale factor 2"):
    ours.to_latents(np.zeros((1, 3, 16, 25), np.float32))
  with pytest.raises(ValueError, match="4 channels; the autoencoder expects 3"):
    ours.encode(np.zeros((1, 4, 16, 16), np.float32))
  with pytest.raises(ValueError, match="rank 4"):
    ours.encode(np.zeros((3, 16, 16), np.float32))
  with pytest.raises(ValueError, match="floating point"):
    ours.encode(np.zeros((1, 3, 16, 16), np.uint8))
  with pytest.raises(ValueError, match="empty"):
    ours.encode(np.zeros((0, 3, 16, 16), np.float32))
  with pytest.raises(ValueError, match="3 channels; the autoencoder expects 4"):
    ours.decode(np.zeros((1, 3, 8, 8), np.float32))
  with pytest.raises(ValueError, match="rank 4"):
    ours.from_latents(np.zeros((4, 8, 8), np.float32))
  # the functional face checks NHWC shapes at trace time
  with pytest.raises(ValueError, match="height 9"):
    ae_lib.encode(ours.params, ours.cfg, jnp.zeros((1, 9, 8, 3)))
  with pytest.raises(ValueError, match="5 channels"):
    ae_lib.decode(ours.params, ours.cfg, jnp.zeros((1, 8, 8, 5)))


def test_attention_in_query_chunks(tiny, monkeypatch):
  """Long token sequences run the mid-block attention a chunk of queries at a
  time (padded at the end); the result is the same."""
  model, _, ours = tiny
  monkeypatch.setattr(ae_lib, "_ATTN_QUERY_CHUNK", 10)   # 8*12 = 96 latent tokens: 10 chunks
  x = _images(16, 24)
  mean = ae_lib.encode(ours.params, ours.cfg, jnp.asarray(x.transpose(0, 2, 3, 1)))
  e = _err(np.asarray(mean).transpose(0, 3, 1, 2), _ref_encode(model, x))
  print(f"[vae parity] chunked attention encode max|d| {e:.2e}")
  assert e <= TOL


def test_flux_size_layout_consistent():
  """FLUX.1's full config: the module's parameter tree (shapes only, nothing
  computed) is exactly what the checkpoint mapping fills."""
  shapes = ae_lib.param_shapes(FLUX1_AE)
  flat = {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  want = {}
  for ent in ae_ckpt._entries(FLUX1_AE):  # pylint: disable=protected-access
    if ent.kind == "conv":     # torch [out, in, kh, kw] -> [kh, kw, in, out]
      w = tuple(ent.shape[2:]) + (ent.shape[1], ent.shape[0])
    else:
      w = ent.shape if ent.kind == "norm" else ent.shape[::-1]
    want[ent.path + ("scale" if ent.kind == "norm" else "kernel",)] = w
    want[ent.path + ("bias",)] = ent.shape[:1]
  assert {k: tuple(v.shape) for k, v in flat.items()} == want
  assert all(v.dtype == jnp.bfloat16 for v in flat.values())
  n = sum(int(np.prod(v.shape)) for v in flat.values())
  print(f"[vae] FLUX.1 autoencoder: {len(flat)} tensors, {n / 1e6:.2f}M parameters")
  assert FLUX1_AE.scale_factor == 8


@pytest.mark.slow
def test_flux_size_runs_bfloat16():
  """FLUX.1's full-size autoencoder, random weights, bfloat16: shapes and
  finiteness through encode / decode / to_latents / from_latents."""
  ours = Autoencoder(FLUX1_AE, ae_lib.init_params(FLUX1_AE, jax.random.PRNGKey(0)))
  x = _images(64, 48, b=1)
  lat = ours.to_latents(x)
  assert lat.shape == (1, 16, 8, 6) and np.isfinite(lat).all()
  img = ours.from_latents(lat)
  assert img.shape == (1, 3, 64, 48) and np.isfinite(img).all()
