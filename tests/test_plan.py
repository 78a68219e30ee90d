"""The memory planner and the real configs it reads."""

import os
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (registers config parsing)

from auditdm_jax import config_check, models
from auditdm_jax.tools import plan as plan_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, arg=None):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_parse_slice():
  assert plan_tool.parse_slice("v5p-32") == plan_tool.Slice("v5p-32", 16, 95.0)
  assert plan_tool.parse_slice("v5e-16").chips == 16
  assert plan_tool.parse_slice("v6e-64") == plan_tool.Slice("v6e-64", 64, 32.0)
  for bad in ("v5p-33", "v7-8", "tpu"):
    with pytest.raises(ValueError):
      plan_tool.parse_slice(bad)


def test_real_configs_are_valid():
  for name, arg in (("audit_paligemma2", "size=10b,res=896"), ("audit_gemma3", None)):
    c = _load(name, arg)
    config_check.check(c, check_inputs=False)   # no checkpoints or data here
    assert sum(s.role == "auditor" for s in c.models.values()) == 1
  c = _load("audit_paligemma2", "size=28b,res=224")
  assert c.models.target.preset == "paligemma2-28b-224"
  assert {c.models[k].preset for k in c.models if k.startswith("ref_")} == {
      "paligemma2-3b-224", "paligemma2-10b-224"}
  with pytest.raises(ValueError, match="unknown config argument"):
    _load("audit_paligemma2", "sise=3b")


def test_plan_figures_follow_shapes_and_sharding():
  c = _load("audit_paligemma2", "size=3b,res=448")
  res = plan_tool.plan(c, ["v5p-32", "v5p-64"])
  a32, a64 = res["v5p-32"]["models"]["auditor"], res["v5p-64"]["models"]["auditor"]
  n = models.count_params(models.get_preset("gemma3-4b"))
  # float32 auditor over fsdp=16: about 4 bytes x params / 16 (small arrays replicated).
  assert a32["params"] == pytest.approx(4 * n / 16, rel=0.02)
  assert a32["optimizer"] == pytest.approx(2 * a32["grads"], rel=1e-6)  # two f32 moments
  assert a64["params"] < a32["params"] and a64["kv_cache"] < a32["kv_cache"]
  assert res["v5p-64"]["peak"] < res["v5p-32"]["peak"]
  target = res["v5p-32"]["models"]["target"]
  assert target["params"] == pytest.approx(
      2 * models.count_params(models.get_preset("paligemma2-3b-448")) / 16, rel=0.02)


def test_plan_cli_names_the_smallest_fitting_slice():
  proc = subprocess.run(
      [sys.executable, "-m", "auditdm_jax.tools.plan",
       f"--config={ROOT}/configs/audit_gemma3.py", "--slices=v5e-16,v5p-32,v5p-64,v6e-64"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  for name in ("v5e-16", "v5p-32", "v5p-64", "v6e-64"):
    assert name in out
  assert "smallest slice that fits the auditor training step" in out or "no listed slice" in out
  proc = subprocess.run(
      [sys.executable, "-m", "auditdm_jax.tools.plan",
       f"--config={ROOT}/configs/audit_gemma3.py", "--slices=v9-3"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2 and "unknown TPU slice 'v9-3'" in proc.stderr


@pytest.mark.parametrize("name", ["audit_paligemma2", "audit_gemma3"])
def test_every_listed_slice_fits(name):
  """configs/common.py SLICES: each slice's mesh and gradient accumulation fit
  the planner's HBM budget for both real configs (3B target at 448 px)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("common", os.path.join(ROOT, "configs",
                                                                       "common.py"))
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  peaks = {}
  for sl in common.SLICES:
    c = _load(name, f"slice={sl}")
    r = plan_tool.plan(c)[sl]
    assert r["fits"], (sl, r["peak"] / 2**30, r["limit"] / 2**30)
    peaks[sl] = r["peak"]
  assert peaks["v5p-64"] < peaks["v5p-32"] < peaks["v5p-16"]
  # A slice left out of the table is reported as not fitting.
  c = _load(name, "slice=v5e-32")
  assert not plan_tool.plan(c, ["v5e-16"])["v5e-16"]["fits"]


def test_plan_counts_the_flux_editor_and_generator():
  base = _load("audit_paligemma2", "size=3b,res=448")
  with_flux = _load("audit_paligemma2", "size=3b,res=448,editor=flux")
  config_check.check(with_flux, check_inputs=False)
  a = plan_tool.plan(base, ["v5p-64"])["v5p-64"]
  b = plan_tool.plan(with_flux, ["v5p-64"])["v5p-64"]
  assert {"editor", "generator"} <= set(b["models"]) and "editor" not in a["models"]
  chips = b["slice"].chips
  # FLUX.1 dev / Kontext transformer 11.9B + T5 XXL encoder 4.76B + CLIP-L text
  # 0.12B + autoencoder 0.08B parameters, bfloat16, spread over the chips
  per_model = b["models"]["editor"]["params"] * chips / 2
  assert 16.5e9 < per_model < 17.3e9, per_model
  assert b["resident"] - a["resident"] == pytest.approx(
      b["models"]["editor"]["params"] + b["models"]["generator"]["params"])
  # Kontext denoises twice the image tokens (its reference), so needs more
  ed, gen = b["models"]["editor"], b["models"]["generator"]
  assert ed["denoise"] > gen["denoise"] > 0 and ed["vae_decode"] == gen["vae_decode"] > 0
  assert b["phases"]["denoise:editor"] == max(ed["denoise"], ed["vae_decode"])
  assert "editor" in plan_tool.format_plan({"v5p-64": b}, with_flux)
