"""The real configs (configs/audit_paligemma2.py, audit_gemma3.py) on files
written here: tiny checkpoints under the release names (big_vision .npz for
PaliGemma 2 with its tokenizer, our Orbax format for the Gemma 3 auditor) and
big_vision-style jsonl datasets with PNG images. The config check names every
missing input before any model is built; with `runlocal=true` the whole
pipeline runs on CPU through `main`."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import config_flags  # noqa: F401  (registers config parsing)
from PIL import Image

from auditdm_jax import config_check, models
from auditdm_jax.models import presets
from auditdm_jax.models.tokenizer import train_sentencepiece
from auditdm_jax.tools import plan as plan_lib
from tests.test_plan import _load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("what colour is the cat how many dogs are there is it raining where is the red "
         "ball answer en yes no two three blue green a an of on in image describe the "
         "picture question write edit caption").split()


def _corpus():
  rng = np.random.default_rng(0)
  return [" ".join(rng.choice(WORDS, 8)) for _ in range(400)]


def write_checkpoints(ckpt_dir, config):
  """Tiny models at the config's checkpoint paths. The references share their
  weights, so that they always agree: a consensus to differ from, and
  exemplars to rectify on."""
  os.makedirs(ckpt_dir, exist_ok=True)
  pg_tok = train_sentencepiece(_corpus(), vocab_size=120, family="paligemma")
  g3_tok = train_sentencepiece(_corpus(), vocab_size=120, family="gemma3")
  pg_tok.save(os.path.join(ckpt_dir, "tokenizer.model"))   # beside the .npz files
  for i, (name, spec) in enumerate(sorted(config.models.items())):
    path = spec.checkpoint
    seed = 100 if spec.role == "reference" else i
    if "paligemma" in os.path.basename(path):
      cfg = presets.tiny_paligemma2(vocab_size=128, sliding_window=None)
      models.VLM.random(cfg, seed=seed, tokenizer=pg_tok).export_npz(path)
    else:   # Gemma 3: the auditor, and the Gemma 3 config's target and references
      cfg = presets.tiny_gemma3(vocab_size=128, boi_id=g3_tok.boi_id, eoi_id=g3_tok.eoi_id)
      models.VLM.random(cfg, seed=seed, tokenizer=g3_tok).save(path)


def _png(rng) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def write_data(config, n=6):
  """Every jsonl the config names, with n examples and their images."""
  rng = np.random.default_rng(1)
  specs = [config.data.seed_images, config.data.rectify_train,
           *config.data.benchmarks.values()]
  for spec in specs:
    base = os.path.dirname(spec.path)
    os.makedirs(os.path.join(base, "images"), exist_ok=True)
    lines = []
    for i in range(n):
      name = f"images/{i}.png"
      with open(os.path.join(base, name), "wb") as f:
        f.write(_png(rng))
      lines.append(json.dumps({"image": name, "prefix": f"how many dogs {i}",
                               "suffix": ["two", "yes", "blue"][i % 3]}))
    with open(spec.path, "w") as f:
      f.write("\n".join(lines) + "\n")


def test_missing_checkpoints_and_datasets_are_named_before_any_model(tmp_path):
  arg = f"ckpt_dir={tmp_path}/ckpts,data_dir={tmp_path}/data"
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check(_load("audit_paligemma2", arg))
  msg = str(e.value)
  for path in (f"{tmp_path}/ckpts/paligemma2-3b-pt-448.npz",
               f"{tmp_path}/ckpts/paligemma2-28b-pt-448.npz", f"{tmp_path}/ckpts/gemma3-4b-it",
               f"{tmp_path}/data/vqav2/train.jsonl", f"{tmp_path}/data/chartqa/test.jsonl"):
    assert path in msg, (path, msg)
  # The planner needs neither.
  config_check.check(_load("audit_gemma3", arg), check_inputs=False)
  # No data_dir at all: the data sections say the path is not given.
  with pytest.raises(config_check.ConfigError, match=r"data.seed_images: jsonl datasets "
                     r"need \['path'\]"):
    config_check.check(_load("audit_gemma3", f"ckpt_dir={tmp_path}"))
  # main exits 2 with the same message, without building or compiling a model.
  out = subprocess.run([sys.executable, "-m", "auditdm_jax.main",
                        f"--config=configs/audit_gemma3.py:{arg}",
                        f"--workdir={tmp_path}/w"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  assert f"{tmp_path}/ckpts/gemma3-27b-it" in out.stderr
  assert "== stage" not in out.stdout


def test_real_config_arguments_and_slices():
  c = _load("audit_paligemma2", "size=10b,res=896,slice=v6e-32,runlocal=false")
  assert c.models.target.preset == "paligemma2-10b-896" and c.slice == "v6e-32"
  w = plan_lib.workload(c)
  assert c.audit.optim.grad_accum == w.grad_accum == 1 and tuple(c.plan.slices) == ("v6e-32",)
  assert c.audit.prompts_per_step * c.audit.grpo.num_samples == w.global_batch == 256
  c.audit.max_new_tokens = 32         # an override of the audit section reaches the plan
  assert plan_lib.workload(c).max_new_tokens == 32 and not w.train_vision
  assert c.audit.editor == "none" and dict(c.audit.mixture) == {"question": 1.0}
  with pytest.raises(ValueError, match="slice must be one of"):
    _load("audit_gemma3", "slice=v9-8")
  with pytest.raises(ValueError, match="must be true or false"):
    _load("audit_gemma3", "runlocal=maybe")
  # An edit pairing needs an image editor.
  c.audit.mixture = {"question": 0.5, "edit": 0.5}
  with pytest.raises(config_check.ConfigError, match=r"pairings \['edit'\] need an image"):
    config_check.check(c, check_inputs=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["audit_paligemma2", "audit_gemma3"])
def test_runlocal_runs_every_stage_on_files_written_here(tmp_path, name):
  arg = f"ckpt_dir={tmp_path}/ckpts,data_dir={tmp_path}/data,runlocal=true"
  config = _load(name, arg)
  write_checkpoints(f"{tmp_path}/ckpts", config)
  write_data(config)
  config_check.check(config)
  out = subprocess.run([sys.executable, "-m", "auditdm_jax.main",
                        f"--config=configs/{name}.py:{arg}", f"--workdir={tmp_path}/w"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  w = tmp_path / "w"
  stages = json.loads((w / "stages.json").read_text())
  assert set(stages) >= {"init", "audit", "mine", "rectify", "eval", "report"}
  audit = json.loads((w / "audit.json").read_text())
  assert audit["steps"] == 2 and 0.0 <= audit["success_rate"]["trained"] <= 1.0
  mine = json.loads((w / "mine.json").read_text())
  assert mine["seeds"] == 4 and mine["probes"] >= 0
  ev = json.loads((w / "eval.json").read_text())
  benches = sorted(config.data.benchmarks)
  for m in ("target", *[k for k in config.models if k.startswith("ref_")]):
    acc = ev["models"][m]["accuracy"]
    assert sorted(k for k in acc if k != "mean") == benches
    assert all(0.0 <= v <= 1.0 for v in acc.values())
  assert mine["exemplars"] > 0, mine          # the references agree; the target differs
  rect = json.loads((w / "rectify.json").read_text())
  assert sorted(k for k in rect["accuracy_before"]["target"] if k != "mean") == benches
  assert not rect["skipped"] and rect["train"]["steps"] == 2
  assert (w / "models" / "target_rectified").exists()
  assert (w / "report.html").exists()
