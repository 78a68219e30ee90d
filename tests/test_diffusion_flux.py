"""The FLUX transformer (`auditdm_jax.diffusion.flux`) against diffusers'
FluxTransformer2DModel on the tiny random reference (tests/flux_reference.py):
forward parity in float32 (with and without guidance, Kontext-shaped
inputs), loading diffusers directories (single file and sharded) and Black
Forest Labs single files, bfloat16, and the errors for bad checkpoints and
bad inputs."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch

from auditdm_jax.diffusion import flux
from auditdm_jax.diffusion.ckpt import flux as flux_ckpt
from auditdm_jax.diffusion.common import CheckpointError
from tests import flux_reference as ref

TOL = 1e-4
R = ref.TRANSFORMER
D = R["num_attention_heads"] * R["attention_head_dim"]   # 32
M = 4 * D                                                # 128
H = R["attention_head_dim"]                              # 16
C = R["in_channels"]                                     # 16


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _cfg(model, dtype="float32") -> flux.FluxConfig:
  return flux.FluxConfig.from_diffusers(dict(model.config), dtype=dtype)


def _image_ids(h: int, w: int, first: float = 0.0) -> np.ndarray:
  """FluxPipeline._prepare_latent_image_ids: (first, row, col) per token."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([np.full(h * w, first), rows.ravel(), cols.ravel()], -1).astype(np.float32)


def _inputs(seed=0, batch=2, hw=(3, 5), text_len=7, ref_hw=None, guidance=True):
  """Random forward inputs; ref_hw adds Kontext reference-image tokens whose
  ids have first coordinate 1 after the noisy tokens."""
  rng = np.random.default_rng(seed)
  img_ids = _image_ids(*hw)
  if ref_hw is not None:
    img_ids = np.concatenate([img_ids, _image_ids(*ref_hw, first=1.0)])
  n = img_ids.shape[0]
  return dict(
      hidden_states=rng.standard_normal((batch, n, C)).astype(np.float32),
      encoder_hidden_states=rng.standard_normal((batch, text_len, R["joint_attention_dim"]))
      .astype(np.float32),
      pooled_projections=rng.standard_normal((batch, R["pooled_projection_dim"]))
      .astype(np.float32),
      timestep=rng.uniform(0.05, 1.0, batch).astype(np.float32),
      img_ids=img_ids, txt_ids=np.zeros((text_len, 3), np.float32),
      guidance=np.full(batch, 3.5, np.float32) if guidance else None)


def _torch_out(model, inp) -> np.ndarray:
  t = {k: None if v is None else torch.from_numpy(np.asarray(v)) for k, v in inp.items()}
  with torch.no_grad():
    return model(**t, return_dict=False)[0].numpy()


def _max_diff(a, b) -> float:
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def tiny():
  """(diffusers model, our float32 Transformer) on the guidance config."""
  model = ref.transformer(seed=0)
  cfg = _cfg(model)
  return model, flux.Transformer(cfg, flux_ckpt.params_from_diffusers(_state_dict(model), cfg, "ref"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
  path = tmp_path_factory.mktemp("flux_transformer")
  tiny[0].save_pretrained(path)
  return str(path)


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------


def test_config_facts():
  cfg = flux.FLUX1_DEV
  assert (cfg.width, cfg.out, cfg.mlp_dim) == (3072, 64, 12288)
  assert cfg.guidance_embeds and cfg.axes_dims_rope == (16, 56, 56)
  # The published transformer/config.json of FLUX.1 dev and FLUX.1 Kontext dev.
  published = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
               "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True,
               "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
               "num_layers": 19, "num_single_layers": 38, "out_channels": None,
               "patch_size": 1, "pooled_projection_dim": 768}
  assert flux.FluxConfig.from_diffusers(published) == flux.FLUX1_DEV
  # FLUX.1 dev: 11.9 B parameters.
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flux.param_shapes(flux.FLUX1_DEV)))
  assert n == 11_901_408_320


def test_config_errors():
  with pytest.raises(ValueError, match="unknown field.*'bogus'"):
    flux.FluxConfig.from_diffusers({**ref.TRANSFORMER, "bogus": 1})
  with pytest.raises(ValueError, match="patch_size"):
    flux.FluxConfig.from_diffusers({**ref.TRANSFORMER, "patch_size": 2})
  with pytest.raises(ValueError, match="axes_dims_rope"):
    flux.FluxConfig.from_diffusers({**ref.TRANSFORMER, "axes_dims_rope": [4, 4, 4]})
  with pytest.raises(ValueError, match="num_attention_heads"):
    flux.FluxConfig.from_diffusers({**ref.TRANSFORMER, "num_attention_heads": 0})
  with pytest.raises(ValueError, match="dtype"):
    flux.FluxConfig(dtype="int8")
  # diffusers' default for a config without the field is no guidance embedder.
  d = {k: v for k, v in ref.TRANSFORMER.items() if k != "guidance_embeds"}
  assert not flux.FluxConfig.from_diffusers(d).guidance_embeds


# ----------------------------------------------------------------------------
# Forward parity (float32).
# ----------------------------------------------------------------------------


def test_parity_with_guidance(tiny):
  model, ours = tiny
  inp = _inputs(seed=1)                      # batch 2, 15 image and 7 text tokens
  diff = _max_diff(ours(**inp), _torch_out(model, inp))
  print(f"flux forward (guidance) max abs diff {diff:.3g}")
  assert diff <= TOL


def test_parity_without_guidance_embeds():
  model = ref.transformer(seed=3, guidance_embeds=False)
  cfg = _cfg(model)
  assert not cfg.guidance_embeds
  ours = flux.Transformer(cfg, flux_ckpt.params_from_diffusers(_state_dict(model), cfg, "ref"))
  inp = _inputs(seed=2, hw=(5, 3), text_len=9, guidance=False)
  want = _torch_out(model, inp)
  diff = _max_diff(ours(**inp), want)
  print(f"flux forward (no guidance embeds) max abs diff {diff:.3g}")
  assert diff <= TOL
  # A guidance value is ignored by a model without a guidance embedder.
  np.testing.assert_array_equal(ours(**{**inp, "guidance": np.ones(2, np.float32)}),
                                ours(**inp))


def test_parity_kontext_reference_tokens(tiny):
  model, ours = tiny
  # 3x5 noisy tokens followed by 2x3 reference-image tokens with ids (1, h, w).
  inp = _inputs(seed=4, hw=(3, 5), ref_hw=(2, 3), text_len=6)
  assert inp["img_ids"].shape == (21, 3) and (inp["img_ids"][15:, 0] == 1).all()
  diff = _max_diff(ours(**inp), _torch_out(model, inp))
  print(f"flux forward (Kontext) max abs diff {diff:.3g}")
  assert diff <= TOL


def test_batched_ids_and_scalar_timestep(tiny):
  _, ours = tiny
  inp = {**_inputs(seed=5), "timestep": np.full(2, 0.5, np.float32)}
  # Deprecated [B, S, 3] ids (the first is used) with one timestep / guidance
  # for the whole batch.
  other = {**inp, "img_ids": np.stack([inp["img_ids"], 0 * inp["img_ids"]]),
           "txt_ids": np.stack([inp["txt_ids"]] * 2),
           "timestep": np.float32(0.5), "guidance": np.float32(3.5)}
  np.testing.assert_allclose(ours(**other), ours(**inp), atol=1e-6)


def test_params_are_stacked_and_scanned(tiny):
  _, ours = tiny
  blocks = ours.params["transformer_blocks"]
  assert blocks["to_q"]["kernel"].shape == (R["num_layers"], D, D)
  assert ours.params["single_transformer_blocks"]["proj_out"]["kernel"].shape == \
      (R["num_single_layers"], D + M, D)
  inp = _inputs(seed=6)
  jaxpr = str(jax.make_jaxpr(lambda p: flux.apply(p, ours.cfg, **inp))(ours.params))
  assert jaxpr.count("scan[") == 2
  # init_params gives the same tree (structure, shapes, dtype).
  rand = flux.init_params(ours.cfg, jax.random.PRNGKey(0))
  assert jax.tree.structure(rand) == jax.tree.structure(ours.params)
  assert jax.tree.map(np.shape, rand) == jax.tree.map(np.shape, ours.params)
  assert all(np.isfinite(np.asarray(x)).all() and x.dtype == np.float32
             for x in jax.tree.leaves(rand))
  assert jax.tree.map(np.shape, flux.param_shapes(ours.cfg)) == jax.tree.map(np.shape, rand)


def test_chunked_attention_matches_full():
  rng = np.random.default_rng(0)
  q, k, v = (jax.numpy.asarray(rng.standard_normal((2, 23, 2, 16)), np.float32)
             for _ in range(3))
  cos, sin = flux.rope_tables(np.asarray(_image_ids(1, 23)), (4, 6, 6))
  hi = jax.lax.Precision.HIGHEST
  full = flux._attention(q, k, v, cos, sin, hi, q_chunk=64)
  for chunk in (5, 8, 23):
    np.testing.assert_allclose(flux._attention(q, k, v, cos, sin, hi, q_chunk=chunk), full,
                               atol=1e-6)


# ----------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------


def test_load_diffusers_directory(tiny, saved):
  model, _ = tiny
  inp = _inputs(seed=7)
  loaded = flux_ckpt.load_transformer(saved, dtype="float32")
  assert loaded.cfg == _cfg(model)
  assert _max_diff(loaded(**inp), _torch_out(model, inp)) <= TOL
  # The weights file itself (its config.json beside it).
  single = flux_ckpt.load_transformer(os.path.join(saved, "diffusion_pytorch_model.safetensors"),
                                 dtype="float32")
  assert single.cfg == loaded.cfg
  jax.tree.map(np.testing.assert_array_equal, single.params, loaded.params)


def test_load_sharded_diffusers_directory(tiny, tmp_path):
  model, ours = tiny
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert any(f.endswith(".safetensors.index.json") for f in os.listdir(tmp_path))
  assert sum(f.endswith(".safetensors") for f in os.listdir(tmp_path)) > 1
  loaded = flux_ckpt.load_transformer(str(tmp_path), dtype="float32")
  inp = _inputs(seed=8)
  assert _max_diff(loaded(**inp), _torch_out(model, inp)) <= TOL
  np.testing.assert_array_equal(loaded(**inp), ours(**inp))


def test_load_bfloat16_is_close(tiny, saved):
  model, ours = tiny
  loaded = flux_ckpt.load_transformer(saved)          # bfloat16 by default
  leaf = loaded.params["transformer_blocks"]["to_q"]["kernel"]
  assert str(leaf.dtype) == "bfloat16" and loaded.cfg.dtype == "bfloat16"
  inp = _inputs(seed=9)
  got, want = loaded(**inp), ours(**inp)
  assert got.dtype == np.float32
  rel = _max_diff(got, want) / float(np.max(np.abs(want)))
  print(f"flux bfloat16 vs float32: max abs diff / max abs = {rel:.3g}")
  # The random tiny model amplifies rounding (diffusers' own bfloat16 run of
  # it is ~0.3 off); ours keeps norms, modulation, RoPE and softmax in float32.
  assert rel < 0.2


def _bfl_state_dict(seed=0, guidance=True, num_layers=2, num_single=2) -> dict[str, np.ndarray]:
  """A random BFL-layout state dict of the tiny config's shapes."""
  rng = np.random.default_rng(seed)
  shapes = {"img_in": (D, C), "txt_in": (D, R["joint_attention_dim"]),
            "time_in.in_layer": (D, 256), "time_in.out_layer": (D, D),
            "vector_in.in_layer": (D, R["pooled_projection_dim"]), "vector_in.out_layer": (D, D),
            "final_layer.adaLN_modulation.1": (2 * D, D), "final_layer.linear": (C, D)}
  if guidance:
    shapes.update({"guidance_in.in_layer": (D, 256), "guidance_in.out_layer": (D, D)})
  for i in range(num_layers):
    for s in ("img", "txt"):
      p = f"double_blocks.{i}.{s}_"
      shapes.update({p + "mod.lin": (6 * D, D), p + "attn.qkv": (3 * D, D),
                     p + "attn.proj": (D, D), p + "mlp.0": (M, D), p + "mlp.2": (D, M)})
  for i in range(num_single):
    p = f"single_blocks.{i}."
    shapes.update({p + "linear1": (3 * D + M, D), p + "linear2": (D, D + M),
                   p + "modulation.lin": (3 * D, D)})
  sd = {}
  for k, (o, i) in shapes.items():
    sd[k + ".weight"] = (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
    sd[k + ".bias"] = (0.3 * rng.standard_normal(o)).astype(np.float32)
  norms = [f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale" for i in range(num_layers)
           for s in ("img", "txt") for q in ("query", "key")]
  norms += [f"single_blocks.{i}.norm.{q}_norm.scale" for i in range(num_single)
            for q in ("query", "key")]
  for k in norms:
    sd[k] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
  return sd


def _diffusers_from_bfl(sd, monkeypatch, **overrides):
  """diffusers' own converter (convert_flux_transformer_checkpoint_to_diffusers)
  loaded strictly into a FluxTransformer2DModel. The converter hard-codes the
  released width 3072 for the linear1 split; scale that split to the tiny width."""
  from diffusers.loaders import single_file_utils as sfu  # pylint: disable=import-outside-toplevel

  class _Torch:
    def __getattr__(self, name):
      return getattr(torch, name)

    @staticmethod
    def split(t, sizes, dim=0):
      if tuple(sizes) == (3072, 3072, 3072, 12288):
        sizes = (D, D, D, M)
      return torch.split(t, sizes, dim=dim)

  monkeypatch.setattr(sfu, "torch", _Torch())
  converted = sfu.convert_flux_transformer_checkpoint_to_diffusers(
      {k: torch.from_numpy(v.copy()) for k, v in sd.items()})
  model = ref.transformer(**overrides)
  model.load_state_dict(converted, strict=True)
  return model


@pytest.mark.parametrize("guidance", [True, False])
def test_load_bfl_single_file(tmp_path, monkeypatch, guidance):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  sd = _bfl_state_dict(seed=11, guidance=guidance)
  path = str(tmp_path / "flux1-tiny.safetensors")
  save_file(sd, path)
  model = _diffusers_from_bfl(sd, monkeypatch, guidance_embeds=guidance)
  loaded = flux_ckpt.load_transformer(path, dtype="float32", axes_dims_rope=R["axes_dims_rope"])
  assert loaded.cfg == _cfg(model)
  inp = _inputs(seed=12, ref_hw=(2, 2), guidance=guidance)
  diff = _max_diff(loaded(**inp), _torch_out(model, inp))
  print(f"flux BFL single file (guidance={guidance}) max abs diff {diff:.3g}")
  assert diff <= TOL
  # The same tensors under ComfyUI's 'model.diffusion_model.' prefix.
  pre = {"model.diffusion_model." + k: v for k, v in sd.items()}
  cfg = flux_ckpt.config_from_bfl(pre, "float32", axes_dims_rope=R["axes_dims_rope"])
  assert cfg == loaded.cfg
  again = flux.Transformer(cfg, flux_ckpt.params_from_bfl(pre, cfg, "prefixed"))
  np.testing.assert_array_equal(again(**inp), loaded(**inp))


def test_config_from_bfl_published_head_dim():
  # Shapes only (no data): a published-size head dim infers the published rope axes.
  shapes = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
            "vector_in.in_layer.weight": (3072, 768), "final_layer.linear.weight": (64, 3072),
            "guidance_in.in_layer.weight": (3072, 256),
            "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
            "double_blocks.0.img_mlp.0.weight": (12288, 3072)}
  shapes.update({f"double_blocks.{i}.img_mod.lin.weight": (1,) for i in range(19)})
  shapes.update({f"single_blocks.{i}.linear1.weight": (1,) for i in range(38)})
  tensors = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  assert flux_ckpt.config_from_bfl(tensors) == flux.FLUX1_DEV
  tiny = _bfl_state_dict()
  with pytest.raises(CheckpointError, match="axes_dims_rope"):
    flux_ckpt.config_from_bfl(tiny)


# ----------------------------------------------------------------------------
# Checkpoint errors.
# ----------------------------------------------------------------------------


def test_unknown_missing_and_wrong_shape_keys(tiny):
  model, ours = tiny
  sd = _state_dict(model)
  with pytest.raises(CheckpointError, match=r"(?s)unknown key 'extra\.weight'.*\(3, 4\)"):
    flux_ckpt.params_from_diffusers({**sd, "extra.weight": np.zeros((3, 4), np.float32)},
                               ours.cfg, "src")
  missing = {k: v for k, v in sd.items() if k != "transformer_blocks.1.attn.to_k.bias"}
  with pytest.raises(CheckpointError, match=r"missing key 'transformer_blocks\.1\.attn\.to_k"
                                            r"\.bias'"):
    flux_ckpt.params_from_diffusers(missing, ours.cfg, "src")
  bad = {**sd, "x_embedder.weight": np.zeros((D, C + 1), np.float32)}
  with pytest.raises(CheckpointError, match=r"(?s)src.*'x_embedder\.weight' has shape \(32, 17\)"
                                            r".*expects \(32, 16\)") as e:
    flux_ckpt.params_from_diffusers(bad, ours.cfg, "src")
  assert "src" in str(e.value)
  bfl = _bfl_state_dict()
  bfl["single_blocks.1.linear1.weight"] = np.zeros((3 * D + M + 1, D), np.float32)
  cfg = dataclasses.replace(ours.cfg)
  with pytest.raises(CheckpointError, match=r"(?s)'single_blocks\.1\.linear1\.weight' has shape "
                                            r"\(225, 32\).*expects \(224, 32\)"):
    flux_ckpt.params_from_bfl(bfl, cfg, "bfl")


def test_file_errors(saved, tmp_path):
  with open(os.path.join(saved, "diffusion_pytorch_model.safetensors"), "rb") as f:
    data = f.read()
  trunc = tmp_path / "trunc"
  trunc.mkdir()
  with open(os.path.join(saved, "config.json")) as f:
    (trunc / "config.json").write_text(f.read())
  (trunc / "diffusion_pytorch_model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors.*truncated"):
    flux_ckpt.load_transformer(str(trunc), dtype="float32")
  # Weights without their config.json.
  noconf = tmp_path / "noconf"
  noconf.mkdir()
  (noconf / "diffusion_pytorch_model.safetensors").write_bytes(data)
  with pytest.raises(CheckpointError, match="config.json"):
    flux_ckpt.load_transformer(str(noconf), dtype="float32")
  # A bad config names the file and the field.
  bad = tmp_path / "badconf"
  bad.mkdir()
  (bad / "diffusion_pytorch_model.safetensors").write_bytes(data)
  (bad / "config.json").write_text(json.dumps({**ref.TRANSFORMER, "num_layers": "two"}))
  with pytest.raises(CheckpointError, match="badconf.*num_layers"):
    flux_ckpt.load_transformer(str(bad), dtype="float32")
  # Not a FLUX transformer.
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  other = str(tmp_path / "other.safetensors")
  save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, other)
  with pytest.raises(CheckpointError, match="other.safetensors.*neither"):
    flux_ckpt.load_transformer(other)


# ----------------------------------------------------------------------------
# Input errors.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,value,match", [
    ("hidden_states", np.zeros((2, 15), np.float32), "hidden_states"),
    ("hidden_states", np.zeros((2, 15, C + 1), np.float32), "hidden_states.*in_channels=16"),
    ("encoder_hidden_states", np.zeros((2, 7, 31), np.float32), "encoder_hidden_states"),
    ("encoder_hidden_states", np.zeros((1, 7, 32), np.float32), "encoder_hidden_states"),
    ("pooled_projections", np.zeros((2, 1, 32), np.float32), "pooled_projections"),
    ("timestep", np.zeros((3,), np.float32), "timestep"),
    ("guidance", np.zeros((2, 1), np.float32), "guidance"),
    ("img_ids", np.zeros((14, 3), np.float32), "img_ids"),
    ("img_ids", np.zeros((15, 2), np.float32), "img_ids"),
    ("txt_ids", np.zeros((7,), np.float32), "txt_ids"),
])
def test_bad_inputs(tiny, name, value, match):
  _, ours = tiny
  inp = _inputs(seed=13)
  with pytest.raises(ValueError, match=match):
    ours(**{**inp, name: value})


def test_guidance_required(tiny):
  _, ours = tiny
  with pytest.raises(ValueError, match="guidance is required"):
    ours(**{**_inputs(seed=14), "guidance": None})
