"""Multi-host on one machine: 2 JAX processes x 4 CPU devices (jax.distributed
with a local coordinator, gloo collectives) against 1 process x 8 devices:
sharded fine-tuning with Orbax checkpoint save and restore, sharded sampling,
GRPO log-probs and one GRPO step (tests/multihost_check.py)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "multihost_check.py")
pytestmark = pytest.mark.slow


def _env():
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def _result(text: str) -> dict:
  lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
  assert lines, text[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  one = subprocess.run([sys.executable, SCRIPT, "one", tmp_path / "one", tmp_path / "one.npz"],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600,
                       check=False)
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, SCRIPT, "two", tmp_path / "two",
                             tmp_path / "two.npz", str(p), str(port)], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for p in (0, 1)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=600)[0])
    finally:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  r1, r2 = _result(one.stdout), _result(outs[0])
  assert r2["processes"] == 2 and r1["processes"] == 1
  assert "RESULT" not in outs[1]              # only process 0 reports
  for r in (r1, r2):
    assert r["steps"] == 4 and r["checkpoints"] == [2, 4]
    assert r["resumed"] and r["restored_equal"]
  np.testing.assert_allclose(r2["losses"], r1["losses"], rtol=1e-5)
  a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert set(a.files) == set(b.files)
  np.testing.assert_array_equal(b["rl/tokens"], a["rl/tokens"])   # the same samples
  for k in a.files:
    if k == "rl/embedding":
      # After one Adam step from fresh moments (update ~ lr * g / |g|), float
      # noise in near-zero gradients shows up at ~1e-4..1e-3 of lr = 3e-2.
      np.testing.assert_allclose(b[k], a[k], atol=2e-3, err_msg=k)
    elif k != "rl/tokens":
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-4, err_msg=k)
  # Only process 0 wrote the metrics: one row per step.
  with open(tmp_path / "two" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]


# -- the tiny config's stages through `main --distributed` ---------------------------

SMOKE = ["--config=configs/tiny.py:smoke", "--config.rounds=1", "--config.audit.steps=1",
         "--config.rectify.steps=2"]


def _main(workdir, stage, devices=8, distributed=None, timeout=900, extra=()):
  """Runs `main` for one stage: one process with `devices` CPU devices, or
  `distributed=(port, n)`: n processes with `devices` each. Returns outputs."""
  env = dict(_env(), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "auditdm_jax.main", *SMOKE, f"--workdir={workdir}",
         f"--config.stage={stage}", *extra]
  if distributed is None:
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return [out.stdout + out.stderr]
  port, n = distributed
  procs = [subprocess.Popen(cmd + ["--distributed"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(env, AUDITDM_COORDINATOR=f"127.0.0.1:{port}",
                                     AUDITDM_NUM_PROCESSES=str(n), AUDITDM_PROCESS_ID=str(p)))
           for p in range(n)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout)[0])
    finally:
      p.kill()
  assert [p.returncode for p in procs] == [0] * n, "\n----\n".join(o[-4000:] for o in outs)
  return outs


def _params(path):
  from auditdm_jax import models  # pylint: disable=import-outside-toplevel
  from auditdm_jax.models.ckpt.common import flatten  # pylint: disable=import-outside-toplevel
  return {k: np.asarray(v, np.float32) for k, v in flatten(models.load(path).params).items()}


def _inject_exemplars(workdir, n=12, target="target_small"):
  from auditdm_jax.data import exemplars_tfds as store  # pylint: disable=import-outside-toplevel
  from auditdm_jax.scenes import examples  # pylint: disable=import-outside-toplevel
  recs = []
  for i, ex in enumerate(examples.examples("seed_images", 100, 100 + n)):
    recs.append({"id": f"injected{i:03d}", "pairing": "question", "route": "question",
                 "auditor_text": ex["question"], "auditor_text2": "", "question": ex["question"],
                 "pseudo_label": ex["answer"],
                 "answers": {"ref_a": ex["answer"], "ref_b": ex["answer"], target: "?"},
                 "failed": [target], "skill": ex["skill"], "factor": "", "context": ex["scene"],
                 "category": f"{ex['skill']}: {ex['answer']}", "auditor": "auditor_trained",
                 "auditor_step": 1, "seed_index": 100 + i, "seed_image": ex["image"],
                 "image": ex["image"]})
  chunks = workdir / "mine" / "chunks"
  store.write_chunk(store.chunk_path(str(chunks), "injected", 0), recs)
  store.publish(str(chunks), str(workdir / "mine" / "tfds"))


def _assert_close(a, b, atol, what):
  assert set(a) == set(b), what
  for k in a:
    np.testing.assert_allclose(b[k], a[k], atol=atol, rtol=0, err_msg=f"{what}: {k}")


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A workdir after the smoke config's init and pretrain stages, with both
  references sharing one set of weights: they always agree, so mining finds
  consensus-backed probes (the smoke models learn nothing) and rectification
  has exemplars to train on."""
  import shutil  # pylint: disable=import-outside-toplevel
  prep = tmp_path_factory.mktemp("prep")
  for stage in ("init", "pretrain"):
    _main(prep, stage)
  shutil.rmtree(prep / "models" / "ref_b")
  shutil.copytree(prep / "models" / "ref_a", prep / "models" / "ref_b")
  return prep


def _copy(prep, dest):
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(prep, dest, symlinks=True)
  return dest


def _sigterm_when(workdir, stage, ready, extra=()):
  """Starts `main` for one stage, sends SIGTERM once ready() holds; returns
  (returncode, output)."""
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  cmd = [sys.executable, "-m", "auditdm_jax.main", *SMOKE, f"--workdir={workdir}",
         f"--config.stage={stage}", *extra]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(_env(), XLA_FLAGS="--xla_force_host_platform"
                                              "_device_count=8"))
  try:
    deadline = time.time() + 600
    while not ready() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.1)
    assert proc.poll() is None, "the stage ended before the signal"
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
  finally:
    proc.kill()
  return proc.returncode, out


@pytest.mark.timeout(2400)
def test_sigterm_in_the_audit_and_mine_stages_saves_and_resumes(prepared, tmp_path):
  """Spot preemption: SIGTERM during the audit stage saves the GRPO step it is
  at and exits 143; during mining it stops after the chunk in progress. The
  same command then resumes and finishes."""
  w = _copy(prepared, tmp_path / "w")
  metrics = w / "audit" / "metrics.jsonl"
  steps = ["--config.audit.steps=4"]
  rc, out = _sigterm_when(w, "audit", lambda: metrics.exists() and _rows(metrics), steps)
  assert rc == 143, out[-3000:]
  assert "Traceback" not in out and "stopped by SIGTERM at audit step" in out, out[-3000:]
  saved = sorted(int(d) for d in os.listdir(w / "audit" / "ckpt") if d.isdigit())
  assert 1 <= saved[-1] < 4 and not (w / "audit.json").exists()
  _main(w, "audit", extra=steps)
  assert [r["step"] for r in _rows(metrics)] == [1, 2, 3, 4]   # resumed, nothing twice
  assert json.loads((w / "audit.json").read_text())["steps"] == 4

  chunks = w / "mine" / "chunks"
  done = lambda: chunks.exists() and any(n.endswith(".jsonl") for n in os.listdir(chunks))  # noqa: E731
  seeds = ["--config.mine.seeds=16"]                                 # 4 chunks of 4 seeds
  rc, out = _sigterm_when(w, "mine", done, seeds)
  assert rc == 143 and "stopped by SIGTERM after mining chunk" in out, out[-3000:]
  first = sorted(n for n in os.listdir(chunks) if n.endswith(".jsonl"))
  assert 1 <= len(first) < 4 and not (w / "mine.json").exists()
  out = _main(w, "mine", extra=seeds)[0]
  assert "chunk 1/4" not in out and "chunk 4/4" in out                 # only the missing chunks
  assert json.loads((w / "mine.json").read_text())["chunks_mined_now"] == 4 - len(first)


@pytest.mark.timeout(2400)   # ~14 min on 2 cores (the module fixture included)
def test_tiny_config_stages_on_two_processes(prepared, tmp_path):
  """configs/tiny.py:smoke through `main --distributed` as 2 processes x 4 CPU
  devices against 1 process x 8: one GRPO step of the audit stage (sharded
  sampling, Orbax checkpoint), the mine stage (one TFDS store, written once)
  and two rectification steps (Grain rows per process); then a rerun of the
  audit stage with a second step restores the 2-process checkpoint."""
  import shutil  # pylint: disable=import-outside-toplevel
  one, two = _copy(prepared, tmp_path / "one"), _copy(prepared, tmp_path / "two")
  port = _free_port()

  # audit: one GRPO step.
  _main(one, "audit")
  outs = _main(two, "audit", devices=4, distributed=(port, 2))
  assert "process 1 of 2, 4 of 8 devices" in outs[1]
  m1, m2 = _rows(one / "audit" / "metrics.jsonl"), _rows(two / "audit" / "metrics.jsonl")
  assert [r["step"] for r in m2] == [1]           # one writer: no duplicate rows
  for key in ("reward", "success_rate", "consensus_rate", "invalid_rate"):
    assert m2[0][key] == m1[0][key], key          # the same rollouts
  for key in ("loss", "kl"):
    np.testing.assert_allclose(m2[0][key], m1[0][key], rtol=1e-4, atol=1e-6, err_msg=key)
  # One Adam step from fresh moments: near-zero gradients show float noise
  # at ~1e-4 of the update (see test_two_processes_match_one).
  _assert_close(_params(one / "models" / "auditor_trained"),
                _params(two / "models" / "auditor_trained"), 2e-3, "trained auditor")
  steps = lambda w: sorted(d for d in os.listdir(w / "audit" / "ckpt") if d.isdigit())  # noqa: E731
  assert steps(two) == steps(one) == ["1"]

  # mine, from the same auditor, so that both runs mine the same probes.
  shutil.rmtree(two / "models" / "auditor_trained")
  shutil.copytree(one / "models" / "auditor_trained", two / "models" / "auditor_trained")
  _main(one, "mine")
  _main(two, "mine", devices=4, distributed=(port, 2))
  j1 = json.loads((one / "mine.json").read_text())
  j2 = json.loads((two / "mine.json").read_text())
  for key in ("probes", "exemplars", "exemplars_of", "failure_types"):
    assert j2[key] == j1[key], key
  chunks = sorted(os.listdir(two / "mine" / "chunks"))
  assert chunks == sorted(os.listdir(one / "mine" / "chunks"))
  for name in chunks:
    if name.endswith(".jsonl"):
      assert [r["id"] for r in _rows(two / "mine" / "chunks" / name)] == \
          [r["id"] for r in _rows(one / "mine" / "chunks" / name)]

  # rectify: two steps on the same global batches. The smoke auditor writes
  # nothing the scene world accepts, so its store is empty: both workdirs get
  # the same extra journal chunk of scene questions labelled by their answer,
  # failed by the audited target, and republish their stores.
  for w in (one, two):
    _inject_exemplars(w)
  _main(one, "rectify")
  _main(two, "rectify", devices=4, distributed=(port, 2))
  r1, r2 = json.loads((one / "rectify.json").read_text()), json.loads(
      (two / "rectify.json").read_text())
  assert not r1["skipped"] and not r2["skipped"], (r1["skipped"], r2["skipped"])
  assert r2["pseudo_labelled_rows"] == r1["pseudo_labelled_rows"] > 0
  target = r1["target"]
  rdir = lambda w: w / "rectify" / target  # noqa: E731
  l1 = [r["loss"] for r in _rows(rdir(one) / "metrics.jsonl")]
  l2 = [r["loss"] for r in _rows(rdir(two) / "metrics.jsonl")]
  assert len(l1) == 2
  np.testing.assert_allclose(l2, l1, rtol=1e-4)
  _assert_close(_params(one / "models" / f"{target}_rectified"),
                _params(two / "models" / f"{target}_rectified"), 1e-4, "rectified target")

  # resume: a second GRPO step restores the 2-process checkpoint of step 1.
  _main(two, "audit", devices=4, distributed=(port, 2), extra=["--config.audit.steps=2"])
  assert [r["step"] for r in _rows(two / "audit" / "metrics.jsonl")] == [1, 2]
  assert steps(two) == ["1", "2"]


def test_a_workdir_the_hosts_do_not_share_is_refused(tmp_path):
  """Each process given its own directory (as on hosts with local disks): every
  process stops with exit 2 and names the problem, before any stage runs."""
  port = _free_port()
  cmd = [sys.executable, "-m", "auditdm_jax.main", *SMOKE, "--config.stage=init",
         "--distributed"]
  procs = [subprocess.Popen(cmd + [f"--workdir={tmp_path}/host{p}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2",
                                     AUDITDM_COORDINATOR=f"127.0.0.1:{port}",
                                     AUDITDM_NUM_PROCESSES="2", AUDITDM_PROCESS_ID=str(p)))
           for p in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=300)[0])
    finally:
      p.kill()
  assert [p.returncode for p in procs] == [2, 2], outs
  for out in outs:
    assert "is not shared between the hosts: processes [1]" in out, out[-2000:]
    assert "== stage" not in out
