"""One run per workdir: an exclusive lock that names its holder.

`acquire(workdir)` takes the workdir's lock or raises `WorkdirLocked` with a
message naming the holder (pid, host, start time, command). `main.run`
holds it for the whole run (process 0 only, with several processes) and
releases it on exit, on exceptions and on SIGTERM.

The lock is a sequence of generation files `<workdir>/.auditdm.lock.<N>`;
the highest generation is the lock's state. Each file holds JSON (pid, host,
start time, command, heartbeat, released) padded to a fixed size, so the
holder rewrites it in place through the descriptor it created it with.

- Taking a free workdir, or a stale or released lock at generation M, is an
  exclusive create (`O_CREAT | O_EXCL`) of generation M + 1: of several
  processes that judged the same generation M stale, exactly one creates
  M + 1; the others see it and are refused. The winner then lists the files
  again and backs off if a higher generation exists (a slow process that
  judged an old generation may create a number a later winner already cleared),
  and deletes the generations below its own.
- A lock is never deleted while it is the highest generation: release marks
  it `released` in place (deleting it would let a fresh acquirer start again
  at generation 1 beside a slow taker's higher number).
- Stale: on this host, the holder's pid is gone (or is this very process,
  which does not hold it: a restarted container reusing the pid). On another
  host (a shared filesystem such as a gcsfuse mount), its heartbeat is older
  than the stale timeout (`AUDITDM_LOCK_STALE_S`, default 300 s). The holder
  rewrites the heartbeat from a daemon thread every tenth of that timeout.
  A file that cannot be read yet (its creator is writing it) is live until
  its modification time is older than the timeout.

On a filesystem whose exclusive create is not atomic, nothing here is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import threading
import time

LOCK_PREFIX = ".auditdm.lock."
LOCK_BYTES = 4096                # every lock file is padded to this size
DEFAULT_STALE_S = 300.0
STALE_ENV = "AUDITDM_LOCK_STALE_S"
_GENERATION = re.compile(re.escape(LOCK_PREFIX) + r"(\d{1,18})$")
_HELD: set[str] = set()         # real paths of the lock files this process holds


class WorkdirLocked(RuntimeError):
  """The workdir is held by a live run (the message names the holder)."""


def stale_timeout() -> float:
  """Seconds after which another host's heartbeat counts as stale."""
  raw = os.environ.get(STALE_ENV, "")
  if not raw:
    return DEFAULT_STALE_S
  try:
    value = float(raw)
  except ValueError as e:
    raise ValueError(f"{STALE_ENV}={raw!r} is not a number of seconds") from e
  if not value > 0:
    raise ValueError(f"{STALE_ENV}={raw!r} must be > 0 seconds")
  return value


def _host() -> str:
  return socket.gethostname()


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:     # someone else's process: it exists
    return True
  except OverflowError:
    return False
  return True


def _generations(workdir: str) -> dict[int, str]:
  """{generation: path} of the lock files present."""
  found = {}
  try:
    names = os.listdir(workdir)
  except FileNotFoundError:
    return found
  for name in names:
    m = _GENERATION.match(name)
    if m:
      found[int(m.group(1))] = os.path.join(workdir, name)
  return found


def read_holder(path: str) -> dict | None:
  """The lock file's JSON, or None while it is empty or torn (being written)."""
  try:
    with open(path, "rb") as f:
      raw = f.read(LOCK_BYTES + 1)
  except FileNotFoundError:
    return None
  try:
    info = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def describe(info: dict) -> str:
  """pid, host, start time and command of a holder, in words."""
  started = info.get("started")
  when = (time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started))
          if isinstance(started, (int, float)) else "an unknown time")
  beat = info.get("heartbeat")
  age = (f", last heartbeat {max(0.0, time.time() - beat):.0f}s ago"
         if isinstance(beat, (int, float)) else "")
  return (f"pid {info.get('pid')} on host {info.get('host')!r}, started {when}{age}, "
          f"command: {info.get('command', '?')}")


def _judge(path: str, stale_s: float) -> tuple[bool, str]:
  """(free, why): whether the lock file at `path` may be taken over."""
  info = None
  for _ in range(5):          # a torn read (a heartbeat being written): retry
    info = read_holder(path)
    if info is not None or not os.path.exists(path):
      break
    time.sleep(0.02)
  if info is None:
    try:
      age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
      return True, "gone"
    if age > stale_s:
      return True, f"an unreadable lock file {age:.0f}s old"
    return False, (f"the lock file {path} is being written (or is unreadable); "
                   f"it counts as stale {stale_s:.0f}s after its last change")
  if info.get("released"):
    return True, "released"
  pid, host = info.get("pid"), info.get("host")
  if host == _host() and isinstance(pid, int):
    if pid == os.getpid() and os.path.realpath(path) in _HELD:
      return False, describe(info) + " (this very process)"
    if pid == os.getpid() or not _pid_alive(pid):
      return True, f"pid {pid} is gone on this host"
    return False, describe(info)
  beat = info.get("heartbeat")
  if not isinstance(beat, (int, float)):
    return False, describe(info)
  age = time.time() - beat
  if age > stale_s:
    return True, f"heartbeat of host {host!r} is {age:.0f}s old (> {stale_s:.0f}s)"
  return False, describe(info)


class Lock:
  """A held workdir lock: `release()` (also as a context manager)."""

  def __init__(self, workdir: str, generation: int, fd: int, info: dict, stale_s: float):
    self.workdir = workdir
    self.generation = generation
    self.path = os.path.join(workdir, f"{LOCK_PREFIX}{generation}")
    self.info = info
    self.stale_s = stale_s
    self.lost = False
    self._fd = fd
    _HELD.add(os.path.realpath(self.path))
    self._mu = threading.Lock()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="auditdm-lock-heartbeat",
                                    daemon=True)
    self._thread.start()

  def _write(self) -> None:
    os.pwrite(self._fd, _encode(self.info), 0)
    os.fsync(self._fd)

  def heartbeat(self) -> None:
    """Rewrites the heartbeat now; notes (once) when a higher generation
    shows that another process took the lock over."""
    with self._mu:
      if self._fd < 0:
        return
      self.info["heartbeat"] = time.time()
      self._write()
    if not self.lost and max(_generations(self.workdir), default=0) > self.generation:
      self.lost = True
      logging.error("the workdir lock %s was taken over by another process", self.path)

  def _beat(self) -> None:
    period = max(0.05, self.stale_s / 10)
    while not self._stop.wait(period):
      try:
        self.heartbeat()
      except OSError as e:      # a flaky mount: the next beat tries again
        logging.warning("workdir lock heartbeat failed: %s", e)

  def release(self) -> None:
    """Marks the lock released (idempotent). The file stays: the next run
    creates the next generation and clears this one."""
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=5)
    with self._mu:
      if self._fd < 0:
        return
      try:
        self.info["released"] = True
        self.info["heartbeat"] = time.time()
        self._write()
      finally:
        os.close(self._fd)
        self._fd = -1
        _HELD.discard(os.path.realpath(self.path))

  @property
  def held(self) -> bool:
    return self._fd >= 0

  def __enter__(self) -> Lock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _encode(info: dict) -> bytes:
  raw = json.dumps(info, ensure_ascii=True).encode("ascii")
  if len(raw) > LOCK_BYTES:
    raise ValueError(f"lock record of {len(raw)} bytes > {LOCK_BYTES}")
  return raw + b" " * (LOCK_BYTES - len(raw))


def _create(path: str, info: dict) -> int | None:
  """Exclusive create of one generation file: its descriptor, or None when
  another process created it first."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
  except FileExistsError:
    return None
  try:
    os.pwrite(fd, _encode(info), 0)
    os.fsync(fd)
  except BaseException:
    os.close(fd)
    os.unlink(path)
    raise
  return fd


def acquire(workdir: str, *, command: str | None = None, stale_s: float | None = None,
            attempts: int = 20) -> Lock:
  """Takes the workdir's lock, or raises WorkdirLocked naming the holder."""
  stale_s = stale_timeout() if stale_s is None else float(stale_s)
  if command is None:
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
  if len(command) > 1000:
    command = command[:1000] + "..."
  os.makedirs(workdir, exist_ok=True)
  for _ in range(attempts):
    present = _generations(workdir)
    top = max(present, default=0)
    if top:
      free, why = _judge(present[top], stale_s)
      if not free:
        raise WorkdirLocked(f"the workdir {workdir} is in use by another run: {why}. "
                            "Wait for it to finish or stop it (a killed run's lock is "
                            "taken over automatically)")
      if why != "released" and why != "gone":
        logging.warning("taking over the stale workdir lock %s: %s", present[top], why)
    now = time.time()
    info = dict(pid=os.getpid(), host=_host(), started=now, heartbeat=now,
                command=command, generation=top + 1, released=False)
    path = os.path.join(workdir, f"{LOCK_PREFIX}{top + 1}")
    fd = _create(path, info)
    if fd is None:
      continue                  # another process took generation top + 1: look again
    if max(_generations(workdir), default=0) > top + 1:
      os.close(fd)              # a number a later winner had cleared: not ours
      os.unlink(path)
      continue
    for g, p in _generations(workdir).items():
      if g < top + 1:
        try:
          os.unlink(p)
        except FileNotFoundError:
          pass
    return Lock(workdir, top + 1, fd, info, stale_s)
  raise WorkdirLocked(f"the workdir {workdir}: could not take its lock in {attempts} "
                      "attempts (other processes keep taking it)")
