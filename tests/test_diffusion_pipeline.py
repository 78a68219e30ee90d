"""The whole FLUX pipeline against diffusers' FluxPipeline / FluxKontextPipeline:
the same tiny random components (tests/flux_reference.py) saved as a diffusers
pipeline directory, loaded by `diffusion.load`, the same initial noise, 3 steps."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from auditdm_jax import diffusion  # noqa: E402
from auditdm_jax.diffusion import sampler  # noqa: E402
from auditdm_jax.diffusion.common import CheckpointError  # noqa: E402
from tests import flux_reference as ref  # noqa: E402

MAX_SEQ = 16
PROMPTS = ["a red cube left of a blue ball", "Make the sky green!"]


def _build(path: str, kontext: bool):
  out = os.path.join(path, "pipe")
  return ref.save_pipeline(out, kontext), out


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
  return _build(str(tmp_path_factory.mktemp("flux_dev")), kontext=False)


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
  return _build(str(tmp_path_factory.mktemp("flux_kontext")), kontext=True)


def _noise(batch, c, h, w, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, c, h, w)).astype(np.float32)


def test_sigmas_match_the_scheduler():
  import diffusers  # pylint: disable=import-outside-toplevel
  s = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
  for steps, n in ((3, 16), (28, 4096), (50, 1024)):
    lin = np.linspace(1.0, 1 / steps, steps)
    s.set_timesteps(sigmas=lin, mu=sampler.shift_mu(n, sampler.FLUX1_SCHEDULER))
    np.testing.assert_allclose(sampler.sigmas(steps, n), s.sigmas.numpy(), atol=1e-6)


def test_pack_matches_diffusers():
  from diffusers import FluxPipeline  # pylint: disable=import-outside-toplevel
  x = _noise(2, 4, 6, 8)
  packed = FluxPipeline._pack_latents(torch.from_numpy(x), 2, 4, 6, 8).numpy()
  ours = np.asarray(sampler.pack(x.transpose(0, 2, 3, 1)))
  np.testing.assert_array_equal(ours, packed)
  np.testing.assert_array_equal(np.asarray(sampler.unpack(ours, 6, 8)), x.transpose(0, 2, 3, 1))
  ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32).numpy()
  np.testing.assert_array_equal(sampler.image_ids(6, 8), ids)


def test_generate_matches_flux_pipeline(dev):
  pipe, path = dev
  ours = diffusion.load(path, dtype="float32", max_sequence_length=MAX_SEQ)
  assert ours.mode == "generate"
  height, width = 16, 24
  noise = _noise(2, 4, height // 2, width // 2, seed=1)
  packed = pipe._pack_latents(torch.from_numpy(noise), 2, 4, height // 2, width // 2)
  with torch.no_grad():
    want = pipe(prompt=PROMPTS, height=height, width=width, num_inference_steps=3,
                guidance_scale=3.5, latents=packed, output_type="np",
                max_sequence_length=MAX_SEQ).images
  got = ours.generate(PROMPTS, 0, height, width, steps=3, guidance=3.5, noise=noise,
                      output="float")
  assert got.shape == want.shape == (2, height, width, 3)
  err = float(np.abs(got - want).max())
  print(f"generate: max abs diff {err:.2e}")
  assert err <= 1e-3
  # uint8 output and rng-drawn noise: right shape and range, deterministic in the rng
  a = ours.generate(PROMPTS[:1], 7, height, width, steps=2)
  b = ours.generate(PROMPTS[:1], 7, height, width, steps=2)
  assert a.dtype == np.uint8 and a.shape == (1, height, width, 3)
  np.testing.assert_array_equal(a, b)


def test_edit_matches_flux_kontext_pipeline(kontext):
  pipe, path = kontext
  ours = diffusion.load(path, dtype="float32", max_sequence_length=MAX_SEQ)
  assert ours.mode == "edit"
  height, width = 16, 20
  images = np.random.default_rng(2).integers(0, 256, (2, height, width, 3)).astype(np.uint8)
  noise = _noise(2, 4, height // 2, width // 2, seed=3)
  packed = pipe._pack_latents(torch.from_numpy(noise), 2, 4, height // 2, width // 2)
  image_t = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
  with torch.no_grad():
    want = pipe(image=image_t, prompt=PROMPTS, height=height, width=width,
                max_area=height * width, _auto_resize=False, num_inference_steps=3,
                guidance_scale=2.5, latents=packed, output_type="np",
                max_sequence_length=MAX_SEQ).images
  got = ours.edit(images, PROMPTS, 0, steps=3, guidance=2.5, noise=noise, auto_resize=False,
                  output="float")
  assert got.shape == want.shape == (2, height, width, 3)
  err = float(np.abs(got - want).max())
  print(f"edit: max abs diff {err:.2e}")
  assert err <= 1e-3


def test_edit_bad_input(kontext, dev):
  _, path = kontext
  ours = diffusion.load(path, dtype="float32", max_sequence_length=MAX_SEQ)
  img = np.zeros((1, 16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match=r"instructions\[0\] is empty"):
    ours.edit(img, [" "], 0, steps=1, auto_resize=False)
  with pytest.raises(ValueError, match="1 images but 2 instructions"):
    ours.edit(img, ["a", "b"], 0, steps=1, auto_resize=False)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    ours.edit(np.zeros((1, 16, 16), np.uint8)[..., None], ["a"], 0, steps=1)
  with pytest.raises(ValueError, match="too small"):
    ours.edit(np.zeros((1, 2, 16, 3), np.uint8), ["a"], 0, steps=1, auto_resize=False)
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    ours.edit(np.full((1, 16, 16, 3), 2.0, np.float32), ["a"], 0, steps=1, auto_resize=False)
  with pytest.raises(ValueError, match="noise must have shape"):
    ours.edit(img, ["a"], 0, steps=1, auto_resize=False, noise=np.zeros((1, 4, 4, 4)))
  gen = diffusion.load(dev[1], dtype="float32", max_sequence_length=MAX_SEQ)
  with pytest.raises(ValueError, match="needs a FLUX.1 Kontext pipeline"):
    gen.edit(img, ["a"], 0, steps=1)
  with pytest.raises(ValueError, match=r"prompts\[1\]"):
    gen.generate(["ok", ""], 0, 16, 16, steps=1)


def test_bucket_picks_the_kontext_resolution(kontext):
  ours = diffusion.load(kontext[1], dtype="float32", max_sequence_length=MAX_SEQ)
  assert ours.bucket(480, 640) == (880, 1184)
  assert ours.bucket(512, 512) == (1024, 1024)
  assert ours.bucket(18, 23, auto_resize=False) == (16, 20)


def test_load_errors(tmp_path, dev):
  _, path = dev
  with pytest.raises(CheckpointError, match="model_index.json"):
    diffusion.load(str(tmp_path))
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
  with pytest.raises(CheckpointError, match="StableDiffusionPipeline"):
    diffusion.load(str(tmp_path))
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
  os.makedirs(tmp_path / "scheduler")
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(
      json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
  with pytest.raises(CheckpointError, match="no transformer/"):
    diffusion.load(str(tmp_path))


def test_public_faces_match_diffusers(dev):
  """diffusion.flux_transformer / diffusion.autoencoder on the pipeline's
  component directories, numpy in and out, against the diffusers modules."""
  pipe, path = dev
  tr = diffusion.flux_transformer(os.path.join(path, "transformer"), dtype="float32")
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 12, 16)).astype(np.float32)
  enc = rng.standard_normal((2, 5, 32)).astype(np.float32)
  pooled = rng.standard_normal((2, 32)).astype(np.float32)
  t, g = np.array([0.9, 0.3], np.float32), np.array([3.5, 2.0], np.float32)
  img_ids, txt_ids = sampler.image_ids(6, 8), np.zeros((5, 3), np.float32)
  with torch.no_grad():
    want = pipe.transformer(hidden_states=torch.from_numpy(x),
                            encoder_hidden_states=torch.from_numpy(enc),
                            pooled_projections=torch.from_numpy(pooled),
                            timestep=torch.from_numpy(t), img_ids=torch.from_numpy(img_ids),
                            txt_ids=torch.from_numpy(txt_ids), guidance=torch.from_numpy(g),
                            return_dict=False)[0].numpy()
  got = tr(x, enc, pooled, t, img_ids, txt_ids, guidance=g)
  assert np.abs(got - want).max() <= 1e-4
  ae = diffusion.autoencoder(os.path.join(path, "vae"), dtype="float32")
  im = rng.uniform(-1, 1, (1, 3, 8, 12)).astype(np.float32)
  with torch.no_grad():
    mean = pipe.vae.encode(torch.from_numpy(im)).latent_dist.mean.numpy()
    dec = pipe.vae.decode(torch.from_numpy(mean)).sample.numpy()
  assert np.abs(ae.encode(im) - mean).max() <= 1e-4
  assert np.abs(ae.decode(mean) - dec).max() <= 1e-4


def test_load_from_a_url(dev, monkeypatch, tmp_path):
  """A pipeline behind an fsspec URL (memory:// standing in for gs://) is
  staged into the cache and gives the same images as the local directory."""
  import fsspec  # pylint: disable=import-outside-toplevel
  _, path = dev
  fs = fsspec.filesystem("memory")
  fs.put(path.rstrip("/") + "/", "/flux_dev_url/", recursive=True)
  monkeypatch.setenv("AUDITDM_CACHE", str(tmp_path / "cache"))
  remote = diffusion.load("memory://flux_dev_url", dtype="float32", max_sequence_length=MAX_SEQ)
  local = diffusion.load(path, dtype="float32", max_sequence_length=MAX_SEQ)
  noise = _noise(1, 4, 8, 8, seed=9)
  np.testing.assert_array_equal(
      remote.generate(PROMPTS[:1], 0, 16, 16, steps=1, noise=noise),
      local.generate(PROMPTS[:1], 0, 16, 16, steps=1, noise=noise))


_SHARDED = r"""
import sys
import numpy as np
import jax
from auditdm_jax import diffusion, sharding
path = sys.argv[1]
mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "model": 1})
noise = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
img = np.random.default_rng(6).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
out = {}
for name, m in (("single", None), ("sharded", mesh)):
  pipe = diffusion.load(path, dtype="float32", max_sequence_length=16, mesh=m, fsdp_min_size=64)
  out[name] = pipe.edit(img, ["make it red", "add a cat"], 0, steps=2, noise=noise,
                        auto_resize=False, output="float")
  if m is not None:
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(pipe.params["transformer"])}
    assert any("fsdp" in s for s in specs), specs
print("devices", len(jax.devices()), "maxdiff", float(np.abs(out["single"] - out["sharded"]).max()))
"""


def test_edit_sharded_over_a_mesh_matches_one_device(kontext):
  """8 host devices, mesh data=2 x fsdp=4: parameters FSDP-sharded, the batch
  split; the edit equals the single-device one."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SHARDED, kontext[1]], capture_output=True,
                       text=True, env=env, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [x for x in out.stdout.splitlines() if x.startswith("devices")][-1]
  _, n, _, diff = line.split()
  assert int(n) == 8 and float(diff) <= 1e-5, line
