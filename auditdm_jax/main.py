r"""auditdm_jax entry point.

  python -m auditdm_jax.main --config=configs/tiny.py --workdir=/tmp/auditdm
  python -m auditdm_jax.main --config=configs/tiny.py --config.stage=init
  python -m auditdm_jax.main --config=configs/audit_paligemma2.py:size=3b,res=448

`--config.stage=all` (the default) runs every stage in order, reusing the
outputs of finished ones; a single stage reads its inputs from the workdir.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from auditdm_jax import config_check, stages
from auditdm_jax.utils.fileio import atomic_write_text

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pipeline config file (get_config(arg) style).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, data and reports "
    "(default: the config's `workdir`).")


def run(config, workdir: str) -> dict:
  """Runs config.stage ('all' or one stage); returns {stage: wall seconds}."""
  config_check.check(config)
  os.makedirs(workdir, exist_ok=True)
  if config.stage != "all":
    todo = [config.stage]
    stages.get(config.stage)  # raises StageNotImplemented / ValueError early
  else:
    todo = [s for s in stages.ORDER if s in stages.IMPLEMENTED]
  walls = {}
  for name in todo:
    t0 = time.time()
    print(f"== stage {name} ==", flush=True)
    stages.get(name)(config, workdir)
    walls[name] = round(time.time() - t0, 2)
  missing = [s for s in stages.ORDER if s not in stages.IMPLEMENTED]
  if config.stage == "all" and missing:
    print("Not implemented yet (skipped): " + "; ".join(
        f"{s} [{stages.PLANNED[s]}]" for s in missing), flush=True)
  path = os.path.join(workdir, "stages.json")
  previous = {}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
  atomic_write_text(path, json.dumps({**previous, **walls}, indent=2))
  print(f"done: {', '.join(f'{k} {v:.1f}s' for k, v in walls.items())}; "
        f"outputs in {workdir}", flush=True)
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
  workdir = _WORKDIR.value or config.get("workdir", None)
  if not workdir:
    raise app.UsageError("no workdir: pass --workdir or set config.workdir")
  try:
    run(config, os.path.abspath(workdir))
  except (config_check.ConfigError, stages.StageNotImplemented, ValueError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
