r"""The chaos run: kill `main` anywhere, restart it, and lose nothing.

  python -m auditdm_jax.tools.chaos --config=configs/tiny.py:smoke --workdir=/tmp/chaos \
      [--kills=12] [--seed=0] [--signals=KILL,TERM] [--from-workdir=DIR] [-- extra main flags]

`--from-workdir=DIR` starts both runs from a copy of DIR (e.g. a workdir
whose init and pretrain stages have run on the full tiny config, so that
the audit finds, mine stores exemplars and rectify trains; the smoke
config's toy models find nothing). Lock files are not copied.

1. A reference run of `main` in <workdir>/reference, uninterrupted, traced:
   every interruption point it passes (`utils/chaos.py`: atomic writes before
   their rename, checkpoint saves, the exemplar store's publication, model
   directories moved aside, training steps, round links, stage starts and
   ends) is listed with its stage.
2. Kill moments are drawn from the seed over that trace: a stage, a kind of
   point and its occurrence, spread over every stage first, then over the
   kinds of point; each is a SIGKILL or a SIGTERM (both kinds appear); one
   pair is two kills close together (the restarted run is killed again as
   soon as it is back in the stage of the first).
3. The chaos run in <workdir>/chaos: `main` with the same command, armed to
   send itself the signal at one moment (or at that stage's end, when a
   resumed stage passes fewer points), restarted after each death, then once
   more to the end. Every restart runs every stage again; each resumes from
   what it finished.
4. The two workdirs are compared: every JSON / JSONL figure (wall and compile
   times, the run-history fields `reused`, `chunks_mined_now`, `resumed` and
   `start_step`, and the workdir's own path excepted), every model's
   parameters bit for bit, and the exemplar store's records. Each difference names the file
   and the field. Exit status 0 when identical, 1 otherwise.

`chaos.json` in <workdir> records the moments (armed and where each landed),
the exit status of every run and the differences.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import numpy as np

# Keys whose values are measurements of time or the run's history (whether init
# found a model it had written before the kill, how many chunks mine mined in
# its last process rather than found journaled, whether a training run's last
# process resumed from a checkpoint and at which step), not results.
_TIME_KEY = re.compile(r"(^|_)(wall|time|times|compile|elapsed|seconds|step_time|train_s|"
                       r"eval_s|wall_s|started|heartbeat)($|_)|_s$|"
                       r"^(reused|chunks_mined_now|resumed|start_step)$")
_SKIP_FILES = ("stages.json", "chaos.json")
_SKIP_DIRS = ("tb", "eval_cache", "ckpt")


def _run_main(main_args: list[str], workdir: str, env_extra: dict[str, str],
              timeout: float) -> tuple[int, float, str]:
  env = dict(os.environ, **env_extra)
  t0 = time.time()
  p = subprocess.run([sys.executable, "-m", "auditdm_jax.main", *main_args,
                      f"--workdir={workdir}"], env=env, capture_output=True, text=True,
                     timeout=timeout, check=False)
  return p.returncode, time.time() - t0, (p.stdout + p.stderr)[-4000:]


def read_trace(path: str) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
  """(points passed, kills fired) of a trace file: (stage, name, k) each."""
  passed, fired = [], []
  if not os.path.exists(path):
    return passed, fired
  with open(path) as f:
    for line in f:
      parts = line.rstrip("\n").split("\t")
      if len(parts) == 4 and parts[0] == "KILL":
        fired.append((parts[1], parts[2], int(parts[3])))
      elif len(parts) == 3:
        passed.append((parts[0], parts[1], int(parts[2])))
  return passed, fired


def draw_moments(trace: list[tuple[str, str, int]], kills: int, seed: int,
                 signals: tuple[str, ...] = ("KILL", "TERM"), close_pair: bool = True
                 ) -> list[dict[str, Any]]:
  """`kills` moments over the reference run's points: every stage gets one
  before any gets two; within a stage the kinds of point rotate (from a
  seeded order) and the occurrence is drawn from the reference's; signals
  alternate from a seeded start (both appear when kills >= 2). With
  `close_pair`, one kill is followed at once by a second at the start of the
  same stage: the restarted run dies again as soon as it gets back there."""
  if not trace:
    raise ValueError("the reference run passed no interruption point")
  rng = np.random.default_rng(seed)
  by_stage: dict[str, dict[str, int]] = {}
  for stage, name, k in trace:
    kinds = by_stage.setdefault(stage, {})
    kinds[name] = max(kinds.get(name, 0), k)
  stages = list(by_stage)                          # run order
  singles = kills - (1 if close_pair and kills >= 2 else 0)
  turn = {s: [str(n) for n in rng.permutation(sorted(by_stage[s]))] for s in stages}
  picked: list[tuple[str, str, int]] = []
  i = 0
  while len(picked) < singles:
    stage = stages[i % len(stages)]
    i += 1
    name = turn[stage].pop(0)
    turn[stage].append(name)
    moment = (stage, name, int(rng.integers(1, by_stage[stage][name] + 1)))
    if moment not in picked or len(picked) >= sum(sum(v.values()) for v in by_stage.values()):
      picked.append(moment)
  moments = [dict(stage=s, name=n, k=k) for s, n, k in picked]
  if close_pair and kills >= 2:
    j = int(rng.integers(len(moments)))
    moments.insert(j + 1, dict(stage=moments[j]["stage"], name="stage_start", k=1))
  start = int(rng.integers(len(signals)))
  for j, m in enumerate(moments):
    m["signal"] = signals[(start + j) % len(signals)]
  return moments


# -- comparing two workdirs -----------------------------------------------------------


def _strip(value, workdir: str):
  if isinstance(value, dict):
    return {k: _strip(v, workdir) for k, v in value.items() if not _TIME_KEY.search(k)}
  if isinstance(value, list):
    return [_strip(v, workdir) for v in value]
  if isinstance(value, str):
    return value.replace(workdir, "<workdir>")
  return value


def _diff(a, b, where: str, out: list[str]) -> None:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b), key=str):
      if k not in a or k not in b:
        out.append(f"{where}.{k}: only in {'chaos' if k in b else 'reference'}")
      else:
        _diff(a[k], b[k], f"{where}.{k}", out)
  elif isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      out.append(f"{where}: {len(a)} items in the reference, {len(b)} after the kills")
    for i, (x, y) in enumerate(zip(a, b)):
      _diff(x, y, f"{where}[{i}]", out)
  elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return
  elif a != b:
    out.append(f"{where}: {a!r} in the reference, {b!r} after the kills")


def _json_files(root: str) -> list[str]:
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
    for f in sorted(files):
      if (f.endswith(".json") or f.endswith(".jsonl")) and f not in _SKIP_FILES \
          and not f.startswith("."):
        out.append(os.path.relpath(os.path.join(d, f), root))
  return out


def _load_json(path: str):
  with open(path) as f:
    if path.endswith(".jsonl"):
      return [json.loads(line) for line in f if line.strip()]
    return json.load(f)


def _model_dirs(root: str) -> list[str]:
  """Every model directory (our Orbax format) under a `models/` folder."""
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in _SKIP_DIRS)
    if os.path.basename(os.path.dirname(d)) == "models" and "auditdm_model.json" in files:
      out.append(os.path.relpath(d, root))
  return out


def _record_view(record: dict) -> dict:
  """A record with its arrays as digests (comparable, printable)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  out = {}
  for k, v in record.items():
    if isinstance(v, np.ndarray):
      out[k] = f"array{list(v.shape)}:{hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()[:16]}"
    else:
      out[k] = v
  return out


def _store_records(root: str) -> dict[str, Any]:
  """{published store path: {split: [records]}} of every exemplar store."""
  from auditdm_jax.data import exemplars_tfds  # pylint: disable=import-outside-toplevel
  out: dict[str, Any] = {}
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if not x.startswith(".") and not x.endswith(".building"))
    if "dataset_info.json" in files and f"{os.sep}mine{os.sep}tfds" in d:
      try:
        out[os.path.relpath(d, root)] = {
            split: [_record_view(r) for r in exemplars_tfds.data_source(d, split)]
            for split in exemplars_tfds.SPLITS}
      except Exception as e:  # pylint: disable=broad-except
        out[os.path.relpath(d, root)] = f"unreadable: {type(e).__name__}: {e}"
  return out


def compare(reference: str, chaos: str) -> list[str]:
  """Every difference between the two workdirs, each naming file and field."""
  from auditdm_jax import models  # pylint: disable=import-outside-toplevel
  diffs: list[str] = []
  ref_files, chaos_files = _json_files(reference), _json_files(chaos)
  for rel in sorted(set(ref_files) ^ set(chaos_files)):
    diffs.append(f"{rel}: only in {'the reference' if rel in ref_files else 'the chaos run'}")
  for rel in sorted(set(ref_files) & set(chaos_files)):
    try:
      a = _strip(_load_json(os.path.join(reference, rel)), reference)
      b = _strip(_load_json(os.path.join(chaos, rel)), chaos)
    except (OSError, ValueError) as e:
      diffs.append(f"{rel}: unreadable ({e})")
      continue
    _diff(a, b, rel, diffs)
  ref_models, chaos_models = _model_dirs(reference), _model_dirs(chaos)
  for rel in sorted(set(ref_models) ^ set(chaos_models)):
    diffs.append(f"{rel}: model only in {'the reference' if rel in ref_models else 'the chaos run'}")
  import flax  # pylint: disable=import-outside-toplevel
  for rel in sorted(set(ref_models) & set(chaos_models)):
    try:
      pa = flax.traverse_util.flatten_dict(models.load(os.path.join(reference, rel)).params, sep="/")
      pb = flax.traverse_util.flatten_dict(models.load(os.path.join(chaos, rel)).params, sep="/")
    except Exception as e:  # pylint: disable=broad-except
      diffs.append(f"{rel}: unreadable model ({type(e).__name__}: {e})")
      continue
    for k in sorted(set(pa) | set(pb)):
      if k not in pa or k not in pb:
        diffs.append(f"{rel}: parameter {k} only in one run")
      elif not np.array_equal(np.asarray(pa[k]), np.asarray(pb[k])):
        d = float(np.max(np.abs(np.asarray(pa[k], np.float32) - np.asarray(pb[k], np.float32))))
        diffs.append(f"{rel}: parameter {k} differs (max abs {d:.3g})")
  sa, sb = _store_records(reference), _store_records(chaos)
  for rel in sorted(set(sa) | set(sb)):
    a, b = sa.get(rel), sb.get(rel)
    if a is None or b is None:
      diffs.append(f"{rel}: exemplar store only in one run")
      continue
    _diff(_strip(a, reference), _strip(b, chaos), f"{rel} (records)", diffs)
  return diffs


# -- the run --------------------------------------------------------------------------


def seed_workdir(source: str, dest: str) -> None:
  """`dest` becomes a copy of the workdir `source` (a fresh one: an existing
  `dest` is refused), without its lock files."""
  import shutil  # pylint: disable=import-outside-toplevel
  from auditdm_jax.pipeline import lock  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(source):
    raise FileNotFoundError(f"--from-workdir {source}: no such directory")
  if os.path.exists(dest):
    raise FileExistsError(f"{dest} exists: the chaos run starts from a fresh copy of {source}")
  shutil.copytree(source, dest, symlinks=True,
                  ignore=shutil.ignore_patterns(lock.LOCK_PREFIX + "*"))


def chaos_run(main_args: list[str], workdir: str, kills: int, seed: int,
              signals: tuple[str, ...] = ("KILL", "TERM"), close_pair: bool = True,
              timeout: float = 3600.0, log=print, start_from: str | None = None) -> dict:
  """The module docstring's steps 1-4; returns (and writes chaos.json) the
  moments, where each kill landed, every run's exit status and the
  differences. With `start_from`, both runs start from a copy of that
  workdir."""
  from auditdm_jax.utils import chaos as points  # pylint: disable=import-outside-toplevel
  from auditdm_jax.utils.fileio import atomic_write_text  # pylint: disable=import-outside-toplevel
  os.makedirs(workdir, exist_ok=True)
  ref, cha = os.path.join(workdir, "reference"), os.path.join(workdir, "chaos")
  ref_trace, cha_trace = os.path.join(workdir, "reference.trace"), os.path.join(workdir, "chaos.trace")
  for p in (ref_trace, cha_trace):
    if os.path.exists(p):
      os.unlink(p)
  if start_from:
    seed_workdir(start_from, ref)
    seed_workdir(start_from, cha)
  rc, secs, tail = _run_main(main_args, ref, {points.TRACE: ref_trace}, timeout)
  if rc != 0:
    raise RuntimeError(f"the reference run failed (exit {rc}):\n{tail}")
  log(f"chaos: reference run {secs:.0f} s")
  passed, _ = read_trace(ref_trace)
  moments = draw_moments(passed, kills, seed, signals, close_pair)
  runs = []
  for m in moments:
    armed = f"{m['stage']}|{m['name']}|{m['k']}|{m['signal']}"
    before = len(read_trace(cha_trace)[1])
    rc, secs, tail = _run_main(main_args, cha, {points.TRACE: cha_trace, points.KILL: armed},
                               timeout)
    fired = read_trace(cha_trace)[1][before:]
    m["landed"] = "|".join(map(str, fired[0])) if fired else "not reached"
    m["exit"] = rc
    runs.append({"exit": rc, "seconds": round(secs, 1)})
    log(f"chaos: {m['signal']} armed at {m['stage']} / {m['name']} #{m['k']}, landed at "
        f"{m['landed']}: exit {rc} after {secs:.0f} s")
    expected = (-9,) if m["signal"] == "KILL" else (-15, 143)
    if rc not in expected or not fired:
      raise RuntimeError(f"the run armed at {armed} exited {rc} (expected {expected}, "
                         f"killed: {bool(fired)}):\n{tail}")
  rc, secs, tail = _run_main(main_args, cha, {points.TRACE: cha_trace}, timeout)
  runs.append({"exit": rc, "seconds": round(secs, 1)})
  if rc != 0:
    raise RuntimeError(f"the final restart failed (exit {rc}):\n{tail}")
  log(f"chaos: final restart {secs:.0f} s")
  diffs = compare(ref, cha)
  result = {"kills": moments, "runs": runs, "differences": diffs,
            "stages_killed": sorted({m["stage"] for m in moments}),
            "from_workdir": start_from}
  atomic_write_text(os.path.join(workdir, "chaos.json"), json.dumps(result, indent=2))
  return result


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--kills", type=int, default=12)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--signals", default="KILL,TERM")
  ap.add_argument("--no-close-pair", action="store_true")
  ap.add_argument("--timeout", type=float, default=3600.0, help="per run of main, seconds")
  ap.add_argument("--from-workdir", default=None,
                  help="start both runs from a copy of this workdir (its lock files left out)")
  args, extra = ap.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  signals = tuple(s.strip().upper().removeprefix("SIG") for s in args.signals.split(","))
  bad = [s for s in signals if s not in ("KILL", "TERM")]
  if bad or args.kills < 1:
    print(f"error: --signals takes KILL and/or TERM (got {bad}); --kills >= 1", file=sys.stderr)
    return 2
  result = chaos_run([f"--config={args.config}", *extra], os.path.abspath(args.workdir),
                     args.kills, args.seed, signals, not args.no_close_pair, args.timeout,
                     start_from=args.from_workdir)
  kills = result["kills"]
  print(f"chaos: {len(kills)} kills ({sum(k['signal'] == 'KILL' for k in kills)} SIGKILL, "
        f"{sum(k['signal'] == 'TERM' for k in kills)} SIGTERM) in stages "
        f"{', '.join(result['stages_killed'])}")
  if result["differences"]:
    print(f"chaos: {len(result['differences'])} differences:")
    for d in result["differences"][:50]:
      print(f"  {d}")
    return 1
  print("chaos: the final workdir equals the uninterrupted run's")
  return 0


if __name__ == "__main__":
  sys.exit(main())
