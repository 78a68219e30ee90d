r"""auditdm_jax entry point.

  python -m auditdm_jax.main --config=configs/tiny.py --workdir=/tmp/auditdm
  python -m auditdm_jax.main --config=configs/tiny.py --config.stage=init
  python -m auditdm_jax.main --config=configs/audit_paligemma2.py:size=3b,res=448

`--config.stage=all` (the default) runs every stage in order, reusing the
outputs of finished ones; a single stage reads its inputs from the workdir.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time

from absl import app, flags, logging
from ml_collections import config_flags

from auditdm_jax import config_check, stages
from auditdm_jax.pipeline import layout, lock, rounds
from auditdm_jax.utils.fileio import atomic_write_text
from auditdm_jax.utils import chaos

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pipeline config file (get_config(arg) style).", lock_config=True)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first: one process per host "
    "(on TPU VMs the hosts are found from the TPU metadata; elsewhere set "
    "AUDITDM_COORDINATOR=host:port, AUDITDM_NUM_PROCESSES and AUDITDM_PROCESS_ID).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, data and reports "
    "(default: the config's `workdir`).")


# -- flag parsing: config problems as one line, exit 2 --------------------------------

USAGE_EXIT = 2


def _usage_exit(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT)


def _config_spec(argv) -> str | None:
  """The `--config` value on the command line (`--config=X` or `--config X`)."""
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      return None
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _root_cause(e: BaseException) -> BaseException:
  """The innermost exception that `e` was raised while handling."""
  seen = {id(e)}
  while True:
    nxt = e.__cause__ or e.__context__
    if nxt is None or id(nxt) in seen:
      return e
    seen.add(id(nxt))
    e = nxt


def _first_line(text: str) -> str:
  return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "") or repr(text)


def config_error_line(argv, error: BaseException) -> str:
  """One line for a flag-parsing failure: the config file's own message
  (an unknown or malformed argument), an override of the wrong type, or an
  override naming a field the config does not have."""
  spec = _config_spec(argv)
  if "Error whilst parsing config file" in str(error):
    return f"--config={spec}: {_first_line(str(_root_cause(error)))}"
  if isinstance(error, (AttributeError, KeyError)):
    key = str(error).strip("\"' ")
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    named = [o for o in overrides if key and key in o[len("--config."):].split(".")]
    where = named[0] if named else " / ".join(overrides) or "--config"
    return f"{where}: the config has no field {key!r} (see {spec or 'the config file'})"
  return _first_line(str(error))


def parse_flags(argv):
  """absl's flag parsing, except that a missing config file, an argument the
  config does not accept and a malformed `--config.x=...` override end the
  process with one line on stderr and status 2 instead of a traceback."""
  spec = _config_spec(argv)
  if spec is not None:
    path = spec.split(":", 1)[0]
    if not path:
      _usage_exit("--config is empty; pass a config file, e.g. --config=configs/tiny.py")
    if not os.path.isfile(path):
      _usage_exit(f"config file {path!r} does not exist (--config={spec})")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _usage_exit(config_error_line(argv, e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _usage_exit(config_error_line(argv, e))
  return None


# -- one run per workdir ----------------------------------------------------------------

@contextlib.contextmanager
def hold_workdir(workdir: str):
  """Holds the workdir's lock (`pipeline/lock.py`) for the block: process 0
  takes it, every process learns whether it did (all raise WorkdirLocked
  when it did not). Released on exit, on exceptions and on SIGTERM (which
  ends the run with status 143 outside the training loops' own handler)."""
  import jax  # pylint: disable=import-outside-toplevel
  held, refused = None, None
  if jax.process_index() == 0:
    try:
      held = lock.acquire(workdir)
    except lock.WorkdirLocked as e:
      refused = e
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
    if not ok and refused is None:
      refused = lock.WorkdirLocked(f"process 0 could not lock the workdir {workdir} "
                                   "(its log names the holder)")
  if refused is not None:
    raise refused
  old = None
  if (threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
    def _on_term(signum, frame):
      del frame
      raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, _on_term)
  try:
    yield held
  finally:
    if old is not None:
      signal.signal(signal.SIGTERM, old)
    if held is not None:
      held.release()


def initialize_distributed() -> None:
  """jax.distributed.initialize(), from AUDITDM_* variables when they are set
  (CPU collectives then use gloo), else by the platform's auto-detection."""
  import jax  # pylint: disable=import-outside-toplevel
  coord = os.environ.get("AUDITDM_COORDINATOR", "")
  if coord:
    missing = [v for v in ("AUDITDM_NUM_PROCESSES", "AUDITDM_PROCESS_ID") if v not in os.environ]
    if missing:
      raise ValueError(f"AUDITDM_COORDINATOR is set but {missing} are not")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coord, num_processes=int(os.environ["AUDITDM_NUM_PROCESSES"]),
                               process_id=int(os.environ["AUDITDM_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
  print(f"distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} of {jax.device_count()} devices", flush=True)


def check_shared_workdir(workdir: str) -> None:
  """With several processes, every one must see the files process 0 writes
  (Orbax checkpoints, the exemplar store, each stage's outputs): a shared
  filesystem such as a gcsfuse mount of a bucket. Checked once, up front."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return
  nonce = int(multihost_utils.broadcast_one_to_all(
      np.int32(np.random.default_rng().integers(1, 2**31 - 1))))
  path = os.path.join(workdir, f".shared_check_{jax.process_count()}")
  if jax.process_index() == 0:
    atomic_write_text(path, str(nonce))
  multihost_utils.sync_global_devices("auditdm shared workdir written")
  try:
    with open(path) as f:
      ok = f.read().strip() == str(nonce)
  except OSError:
    ok = False
  seen = multihost_utils.process_allgather(np.int32(ok))
  multihost_utils.sync_global_devices("auditdm shared workdir read")
  if jax.process_index() == 0:
    os.unlink(path)
  blind = [int(i) for i in np.flatnonzero(np.asarray(seen) == 0)]
  if blind:
    raise ValueError(f"the workdir {workdir} is not shared between the hosts: processes "
                     f"{blind} do not see what process 0 writes there. Use a filesystem "
                     "every host mounts, e.g. a Cloud Storage bucket through gcsfuse "
                     "(launch/: BUCKET=my-bucket mounts it at /gcs/my-bucket)")


def _record_wall(workdir: str, key: str, seconds: float) -> None:
  from auditdm_jax.sharding import is_primary  # pylint: disable=import-outside-toplevel
  if not is_primary():
    return
  walls = layout.read_summary(workdir, "stages", {})
  walls[key] = round(seconds, 2)
  layout.write_summary(workdir, "stages", json.dumps(walls, indent=2))


def _run_stage(config, name: str, workdir: str, key: str, walls: dict) -> None:
  t0 = time.time()
  print(f"== stage {key} ==", flush=True)
  chaos.set_stage(key)
  chaos.point("stage_start")
  stages.get(name)(config, workdir)
  chaos.point("stage_end")
  from auditdm_jax.sharding import barrier  # pylint: disable=import-outside-toplevel
  barrier(f"auditdm stage {key} done")   # the next stage may read what process 0 wrote
  walls[key] = round(time.time() - t0, 2)
  _record_wall(workdir, key, walls[key])   # after each stage: survives a later crash


def run(config, workdir: str) -> dict:
  """Runs config.stage ('all' or one stage); returns {stage: wall seconds}.

  `all` runs every stage in order; with `config.rounds` = N > 1 the audit ->
  mine -> rectify loop then repeats N - 1 times against the improved target
  (in `<workdir>/rounds/r2`, ...) before eval and report."""
  config_check.check(config)
  if "://" in workdir:
    raise ValueError(f"workdir {workdir!r}: a URL is not a workdir; mount the bucket with "
                     "gcsfuse and pass the mount point (launch/: BUCKET=... mounts it at "
                     "/gcs/<bucket>)")
  os.makedirs(workdir, exist_ok=True)
  check_shared_workdir(workdir)
  with hold_workdir(workdir):
    return _run_held(config, workdir)


def _run_held(config, workdir: str) -> dict:
  walls: dict[str, float] = {}
  if config.stage != "all":
    stages.get(config.stage)  # raises StageNotImplemented / ValueError early
    _run_stage(config, config.stage, workdir, config.stage, walls)
  else:
    dirs = {1: workdir}
    for name, r, key in rounds.schedule(stages.STAGES, int(config.get("rounds", 1))):
      if r not in dirs:
        dirs[r] = rounds.prepare_round(config, workdir, r)
      _run_stage(config, name, dirs[r], key, walls)
      if r > 1:                         # the main workdir's stages.json has every round
        _record_wall(workdir, key, walls[key])
  print(f"done: {', '.join(f'{k} {v:.1f}s' for k, v in walls.items())}; "
        f"outputs in {workdir}", flush=True)
  report = os.path.join(workdir, "report.html")
  if "report" in walls and os.path.exists(report):
    print(f"report: file://{report}", flush=True)
  return walls


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save at INFO; stages print their own progress.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  try:
    config.get("stage", None)   # a config file that failed to load raises here
  except OSError as e:
    _usage_exit(f"--config={_config_spec(sys.argv)}: {_first_line(str(_root_cause(e)))}")
  if _DISTRIBUTED.value:
    initialize_distributed()
  workdir = _WORKDIR.value or config.get("workdir", None)
  if not workdir:
    raise app.UsageError("no workdir: pass --workdir or set config.workdir")
  try:
    run(config, workdir if "://" in workdir else os.path.abspath(workdir))
  except (config_check.ConfigError, stages.StageNotImplemented, lock.WorkdirLocked,
          ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
