"""The config's mesh and per-model partition rules reach every sampler and
trainer the stages build (8 host devices, in a subprocess)."""

import json
import os
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from auditdm_jax.pipeline import placement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  return ConfigDict({"models": {"t": {"role": "target", "partition_rules": [[".*", []]]},
                                "r": {"role": "reference"}},
                     "partition_rules": [["(^|/)embedder/", ["fsdp", None]], [".*", []]]})


def test_rules_resolve_per_model_then_config_then_defaults():
  c = _config()
  assert placement.rules(c, "t") == ((".*", ()),)
  assert placement.rules(c, "t_rectified") == ((".*", ()),)   # derived: the base model's
  assert placement.rules(c, "r")[0][0] == "(^|/)embedder/"
  del c.partition_rules
  from auditdm_jax import sharding  # pylint: disable=import-outside-toplevel
  assert placement.rules(c, "r") == sharding.rules_from_config(None)
  assert placement.mesh_axes(c) == placement.DEFAULT_MESH
  c.mesh = {"data": 2, "fsdp": -1}
  assert placement.mesh_axes(c) == {"data": 2, "fsdp": -1}


@pytest.mark.slow
def test_stages_place_each_model_by_its_rules_on_8_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "placement_check.py"),
                         str(tmp_path / "wd")], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  target, aud, default = res["target"], res["auditor"], res["default"]
  s = res["samplers"]
  # eval, audit and rectify's measurements: the target (and its rectified
  # copy) by its own rule, the references by the defaults.
  ruled = {target, f"{target}_rectified", aud, f"{aud}_trained"}
  for key, specs in s.items():
    name = key.split(":", 1)[1]
    assert len(specs) == 1, (key, specs)
    assert (specs[0] != default) == (name in ruled), (key, specs, default)
  # every stage measured the target through a sampler placed by its rule
  for key in (f"eval:{target}", f"eval:{aud}", f"audit:{target}", f"audit:{aud}",
              f"rectify:{target}_rectified"):   # (rectify's "before" is eval's, cached)
    assert key in s, (key, sorted(s))
  assert any(k.split(":", 1)[1] not in ruled for k in s)
  # The audit's GRPO trainer (the auditor) and rectify's trainer (the target)
  # on the 8-device mesh, by their models' rule.
  kinds = {(t["phase"], t["kind"]) for t in res["trainers"]}
  assert kinds == {("audit", "GRPOTrainer"), ("rectify", "Trainer")}, res["trainers"]
  for t in res["trainers"]:
    assert t["devices"] == 8 and t["embed"] != default, t
  assert not res["rectify_skipped"]
  # pretrain's trainers are on the run's mesh too
  assert res["pretrain_trainers"] and all(t["devices"] == 8 for t in res["pretrain_trainers"])
