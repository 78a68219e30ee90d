"""The gcloud launch scripts: the commands they print under DRY_RUN=1, their
errors on missing settings, and shellcheck."""

import glob
import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
BASE = {"DRY_RUN": "1", "TPU_NAME": "audit-v5p", "ZONE": "us-east5-a", "PROJECT": "my-proj"}


def dry(script: str, **env) -> list[list[str]]:
  full = {k: v for k, v in os.environ.items()
          if k not in ("TPU_NAME", "ZONE", "PROJECT", "QUEUED", "SPOT", "ACCELERATOR",
                       "RUNTIME", "CONFIG", "WORKDIR", "LOCAL_CONFIG", "EXTRA_ENV",
                       "BUCKET")}
  full.update(BASE)
  full.update(env)
  proc = subprocess.run(["bash", os.path.join(LAUNCH, script)], env=full, capture_output=True,
                        text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _flags(argv: list[str]) -> dict[str, str]:
  return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_create_tpu_vm_and_queued_spot():
  (cmd,) = dry("create.sh", ACCELERATOR="v6e-64")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "audit-v5p"]
  f = _flags(cmd)
  assert f == {"accelerator-type": "v6e-64", "version": "v2-alpha-tpuv6e",
               "zone": "us-east5-a", "project": "my-proj"}
  assert "--spot" not in cmd
  create, describe = dry("create.sh", QUEUED="1", SPOT="1", RUNTIME="custom-rt")
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "audit-v5p"]
  assert _flags(create)["node-id"] == "audit-v5p" and "--spot" in create
  assert _flags(create)["runtime-version"] == "custom-rt"
  assert describe[3:5] == ["queued-resources", "describe"]


def test_install_copies_head_and_installs_tpu_extras_on_every_worker(tmp_path):
  cfg = tmp_path / "mine.py"
  cfg.write_text("def get_config(arg=None): ...\n")
  archive, scp, ssh, scp_cfg = dry("install.sh", LOCAL_CONFIG=str(cfg))
  assert archive[:2] == ["git", "-C"] and "archive" in archive and archive[-1] == "HEAD"
  assert scp[3:5] == ["tpu-vm", "scp"] and _flags(scp)["worker"] == "all"
  assert scp[5] == archive[archive.index("-o") + 1]
  assert ssh[3:5] == ["tpu-vm", "ssh"] and _flags(ssh)["worker"] == "all"
  assert "pip install -q -e '.[tpu]'" in _flags(ssh)["command"]
  assert scp_cfg[5] == str(cfg) and scp_cfg[6] == "audit-v5p:auditdm_jax/configs/mine.py"


def test_bucket_is_mounted_on_every_worker_and_is_the_default_workdir():
  *_, mount = dry("install.sh", BUCKET="gs://my-bucket")
  assert mount[3:5] == ["tpu-vm", "ssh"] and _flags(mount)["worker"] == "all"
  cmd = _flags(mount)["command"]
  assert "gcsfuse --implicit-dirs my-bucket /gcs/my-bucket" in cmd
  assert "mountpoint -q /gcs/my-bucket" in cmd
  (ssh,) = dry("run.sh", BUCKET="my-bucket")
  assert "--workdir=/gcs/my-bucket/auditdm/audit-v5p" in _flags(ssh)["command"]
  assert len(dry("install.sh")) == 3          # no bucket: no mount step


def test_run_starts_main_on_all_workers_with_the_config():
  (ssh,) = dry("run.sh", CONFIG="configs/audit_gemma3.py:size=4b", EXTRA_ENV="XLA_FLAGS=--x")
  f = _flags(ssh)
  assert f["worker"] == "all"
  job = shlex.split(f["command"])
  assert "python3" in job and job[job.index("python3") + 1:job.index("python3") + 3] == [
      "-m", "auditdm_jax.main"]
  assert "--config=configs/audit_gemma3.py:size=4b" in job and "--distributed" in job
  assert "--workdir=$HOME/auditdm_work" in job and "XLA_FLAGS=--x" in job
  assert job[-1] == "&"         # detached: the ssh session may end


def test_logs_stop_delete():
  (logs,) = dry("logs.sh")
  assert _flags(logs)["worker"] == "0" and "tail" in _flags(logs)["command"]
  (logs,) = dry("logs.sh", WORKER="3")
  assert _flags(logs)["worker"] == "3"
  (stop,) = dry("stop.sh")
  assert "pkill -TERM -f" in _flags(stop)["command"] and _flags(stop)["worker"] == "all"
  (delete,) = dry("delete.sh")
  assert delete[3:6] == ["tpu-vm", "delete", "audit-v5p"] and "--quiet" in delete
  (delete,) = dry("delete.sh", QUEUED="1")
  assert delete[3:6] == ["queued-resources", "delete", "audit-v5p"] and "--force" in delete


def test_up_runs_every_step_in_order():
  cmds = dry("up.sh")
  verbs = [c[4] if c[0] == "gcloud" else c[3] for c in cmds]
  assert verbs == ["create", "archive", "scp", "ssh", "ssh", "ssh"]


def test_missing_settings_are_named():
  env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")}
  env["DRY_RUN"] = "1"
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "create.sh")], env=env,
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode != 0 and "set TPU_NAME" in proc.stderr and not proc.stdout
  env.update(TPU_NAME="x", ZONE="z", ACCELERATOR="v9-8")
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "create.sh")], env=env,
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode != 0 and "no default runtime for ACCELERATOR=v9-8" in proc.stderr


def test_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.fail("shellcheck not found: run `bash tests/install_system_deps.sh`")
  scripts = sorted(glob.glob(os.path.join(LAUNCH, "*.sh"))) + [
      os.path.join(ROOT, "tests", "install_system_deps.sh"), os.path.join(ROOT, ".ci", "run")]
  proc = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True,
                        timeout=120, check=False, cwd=LAUNCH)
  assert proc.returncode == 0, proc.stdout + proc.stderr
