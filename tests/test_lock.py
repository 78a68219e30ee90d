"""One run per workdir (pipeline/lock.py): a live holder is refused by name,
a killed run's lock is taken over, another host's lock only once its
heartbeat is old, concurrent takeovers have exactly one winner, and `main`
holds the lock for the run and releases it however the run ends."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from auditdm_jax.pipeline import lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _plant(workdir, generation=1, **fields) -> str:
  """Writes a lock file as another run would have left it."""
  now = time.time()
  info = dict(pid=os.getpid(), host=socket.gethostname(), started=now - 60, heartbeat=now,
              command="python -m auditdm_jax.main --config=configs/tiny.py",
              generation=generation, released=False)
  info.update(fields)
  path = os.path.join(workdir, f"{lock.LOCK_PREFIX}{generation}")
  with open(path, "w") as f:
    f.write(json.dumps(info))
  return path


def _files(workdir):
  return sorted(n for n in os.listdir(workdir) if n.startswith(lock.LOCK_PREFIX))


def test_live_holder_is_refused_by_name(tmp_path):
  held = lock.acquire(str(tmp_path), command="python -m auditdm_jax.main --config=X")
  try:
    with pytest.raises(lock.WorkdirLocked) as e:
      lock.acquire(str(tmp_path))
    msg = str(e.value)
    for part in (f"pid {os.getpid()}", repr(socket.gethostname()), "started 20",
                 "command: python -m auditdm_jax.main --config=X", str(tmp_path)):
      assert part in msg, (part, msg)
  finally:
    held.release()
  # Released: the next run takes the next generation and clears this one.
  again = lock.acquire(str(tmp_path))
  assert again.generation == 2 and _files(str(tmp_path)) == [f"{lock.LOCK_PREFIX}2"]
  again.release()


def test_dead_pid_on_this_host_is_taken_over(tmp_path):
  pid = _dead_pid()
  _plant(str(tmp_path), pid=pid)
  held = lock.acquire(str(tmp_path), command="second")
  try:
    assert held.generation == 2 and held.info["pid"] == os.getpid()
    assert _files(str(tmp_path)) == [f"{lock.LOCK_PREFIX}2"]
    assert json.load(open(held.path))["command"] == "second"
  finally:
    held.release()


def test_own_pid_in_a_lock_it_does_not_hold_is_stale(tmp_path):
  """A restarted container can reuse the killed run's pid: this process
  does not hold that lock, so it is a previous incarnation's."""
  _plant(str(tmp_path), pid=os.getpid())
  lock.acquire(str(tmp_path)).release()


def test_foreign_host_waits_for_the_heartbeat_timeout(tmp_path, monkeypatch):
  _plant(str(tmp_path), host="tpu-host-7", pid=1, heartbeat=time.time() - 30)
  with pytest.raises(lock.WorkdirLocked, match="pid 1 on host 'tpu-host-7'"):
    lock.acquire(str(tmp_path), stale_s=120)
  monkeypatch.setenv(lock.STALE_ENV, "10")   # the environment's timeout: now stale
  held = lock.acquire(str(tmp_path))
  assert held.stale_s == 10 and held.generation == 2
  held.release()
  monkeypatch.setenv(lock.STALE_ENV, "soon")
  with pytest.raises(ValueError, match="AUDITDM_LOCK_STALE_S"):
    lock.acquire(str(tmp_path))


def test_unreadable_lock_is_live_until_old(tmp_path):
  """A file its creator is still writing (empty) is not taken over."""
  path = os.path.join(tmp_path, f"{lock.LOCK_PREFIX}1")
  open(path, "w").close()
  with pytest.raises(lock.WorkdirLocked, match="being written"):
    lock.acquire(str(tmp_path), stale_s=60)
  old = time.time() - 120
  os.utime(path, (old, old))
  lock.acquire(str(tmp_path), stale_s=60).release()


def test_heartbeat_is_written_and_a_takeover_is_noticed(tmp_path):
  held = lock.acquire(str(tmp_path), stale_s=0.5)      # beats every 0.05 s
  try:
    first = json.load(open(held.path))["heartbeat"]
    time.sleep(0.3)
    assert json.load(open(held.path))["heartbeat"] > first
    _plant(str(tmp_path), generation=held.generation + 1, pid=_dead_pid())
    time.sleep(0.3)
    assert held.lost
  finally:
    held.release()


def _race(workdir, start, done, results):
  start.wait()
  try:
    held = lock.acquire(workdir, stale_s=60)
  except lock.WorkdirLocked:
    results.put("refused")
    return
  results.put(f"won {held.generation}")
  done.wait(30)                 # hold it until every contender has answered
  held.release()


@pytest.mark.parametrize("trial", range(3))
def test_concurrent_takeovers_have_one_winner(tmp_path, trial):
  """Six processes judge the same stale lock at once: exactly one takes it."""
  ctx = multiprocessing.get_context("spawn")
  _plant(str(tmp_path), generation=3 + trial, pid=_dead_pid())
  start, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
  procs = [ctx.Process(target=_race, args=(str(tmp_path), start, done, results))
           for _ in range(6)]
  for p in procs:
    p.start()
  time.sleep(0.5)
  start.set()
  answers = sorted(results.get(timeout=60) for _ in procs)
  done.set()
  for p in procs:
    p.join(30)
  assert answers == ["refused"] * 5 + [f"won {4 + trial}"], answers


def test_a_slow_taker_that_creates_a_cleared_number_backs_off(tmp_path, monkeypatch):
  """P judged generation 1 stale; meanwhile Q took 2, released it, and R
  took 3 and cleared 1 and 2. P's exclusive create of 2 then succeeds, but
  P sees 3 and backs off: it must not hold the lock beside R."""
  _plant(str(tmp_path), generation=1, pid=_dead_pid())
  real_create = lock._create   # pylint: disable=protected-access
  others = []

  def slow_create(path, info):
    if not others:
      monkeypatch.setattr(lock, "_create", real_create)   # Q and R are quick
      q = lock.acquire(str(tmp_path))
      q.release()
      others.append(lock.acquire(str(tmp_path)))   # R: generation 3, clears 1 and 2
      assert _files(str(tmp_path)) == [f"{lock.LOCK_PREFIX}3"]
    return real_create(path, info)

  monkeypatch.setattr(lock, "_create", slow_create)
  with pytest.raises(lock.WorkdirLocked, match=f"pid {os.getpid()}"):
    lock.acquire(str(tmp_path))
  assert _files(str(tmp_path)) == [f"{lock.LOCK_PREFIX}3"]
  others[0].release()


_HOLDER = textwrap.dedent("""
    import sys, time
    from auditdm_jax import main
    with main.hold_workdir(sys.argv[1]):
      print("held", flush=True)
      if sys.argv[2] == "raise":
        raise RuntimeError("boom")
      time.sleep(60)
""")


def _holder(workdir, mode):
  return subprocess.Popen([sys.executable, "-c", _HOLDER, workdir, mode], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_main_releases_on_sigterm_and_on_exceptions(tmp_path):
  proc = _holder(str(tmp_path), "sleep")
  assert proc.stdout.readline().strip() == "held"
  info = json.load(open(os.path.join(tmp_path, f"{lock.LOCK_PREFIX}1")))
  assert info["pid"] == proc.pid and not info["released"]
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(30) == 128 + signal.SIGTERM
  assert json.load(open(os.path.join(tmp_path, f"{lock.LOCK_PREFIX}1")))["released"]

  proc = _holder(str(tmp_path), "raise")
  assert proc.stdout.readline().strip() == "held"
  assert proc.wait(30) == 1 and "boom" in proc.stderr.read()
  assert json.load(open(os.path.join(tmp_path, f"{lock.LOCK_PREFIX}2")))["released"]


def test_a_killed_holder_is_taken_over(tmp_path):
  proc = _holder(str(tmp_path), "sleep")
  assert proc.stdout.readline().strip() == "held"
  proc.kill()                          # SIGKILL: no finally, the lock stays
  proc.wait(30)
  assert not json.load(open(os.path.join(tmp_path, f"{lock.LOCK_PREFIX}1")))["released"]
  lock.acquire(str(tmp_path)).release()


def test_second_main_is_refused_naming_the_holder(tmp_path):
  """A real `main` against a workdir this process holds exits 2 before
  building any model, naming the holder."""
  held = lock.acquire(str(tmp_path), command="the first run")
  try:
    proc = subprocess.run(
        [sys.executable, "-m", "auditdm_jax.main", f"--config={ROOT}/configs/tiny.py:smoke",
         f"--workdir={tmp_path}", "--config.stage=init"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
  finally:
    held.release()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"pid {os.getpid()}" in proc.stderr and "command: the first run" in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, "models")), os.listdir(tmp_path)
