"""Wall time of the whole tiny loop: a given commit against the working tree.

Runs README command 1's main job (`python -m auditdm_jax.main
--config=configs/tiny.py`) twice, one after the other in this process's
machine, each in a fresh workdir: first at `--base` (a clean `git worktree`
of that commit, so its own code runs), then at the working tree. Reads each
run's `stages.json` and prints every stage's seconds, the totals and the
ratio base / tree. Nothing else should run on the machine meanwhile: the two
runs are the only load, so the ratio compares code, not the machine's mood.

  python bench/loop_time.py --base d9ae8bf
  python bench/loop_time.py --base d9ae8bf --overrides=--config.seed=1
  python bench/loop_time.py --base none        # the working tree alone

The installed packages are this interpreter's (`pip install -e .` of the
tree); each run imports its own checkout's `auditdm_jax` (PYTHONPATH and the
working directory point at it). The last line is `speedup vs base: X.XXx`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_ORDER = ("init", "pretrain", "audit", "mine", "rectify", "eval", "report")


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.lower().startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def snapshot_tree(dest: str) -> str:
  """Copies the working tree's files (git ls-files: tracked and untracked,
  not ignored) to `dest`; returns it."""
  files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, check=True).stdout
  for rel in filter(None, files.decode().split("\0")):
    src = os.path.join(ROOT, rel)
    if not os.path.isfile(src):
      continue          # deleted but still in the index
    os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
    shutil.copy2(src, os.path.join(dest, rel))
  return dest


def run_loop(checkout: str, workdir: str, config: str, overrides: list[str], log: str) -> dict:
  """Runs the main job of `checkout` into `workdir`; returns stages.json and the wall."""
  env = dict(os.environ, PYTHONPATH=checkout)
  where = subprocess.run([sys.executable, "-c", "import auditdm_jax; print(auditdm_jax.__file__)"],
                         cwd=checkout, env=env, capture_output=True, text=True, check=True)
  if not os.path.realpath(where.stdout.strip()).startswith(os.path.realpath(checkout) + os.sep):
    raise SystemExit(f"loop_time: {checkout} would import auditdm_jax from "
                     f"{where.stdout.strip()}, not from itself")
  cmd = [sys.executable, "-m", "auditdm_jax.main", f"--config={config}",
         f"--workdir={workdir}", *overrides]
  t0 = time.time()
  with open(log, "w") as f:
    proc = subprocess.run(cmd, cwd=checkout, env=env, stdout=f, stderr=subprocess.STDOUT,
                          check=False)
  wall = time.time() - t0
  if proc.returncode != 0:
    raise SystemExit(f"loop_time: {' '.join(cmd)} (in {checkout}) exited {proc.returncode}; "
                     f"see {log}")
  with open(os.path.join(workdir, "stages.json")) as f:
    stages = json.load(f)
  return {"stages": stages, "wall_s": wall}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--base", default="d9ae8bf",
                  help="commit to compare against ('none': time the working tree alone)")
  ap.add_argument("--config", default="configs/tiny.py")
  ap.add_argument("--overrides", default="",
                  help="extra main flags, space separated (e.g. --config.seed=1)")
  ap.add_argument("--out", default="", help="a directory for the workdirs and logs "
                  "(default: a temporary one, removed unless --keep)")
  ap.add_argument("--keep", action="store_true", help="keep the workdirs")
  args = ap.parse_args(argv)
  overrides = args.overrides.split()
  out = args.out or tempfile.mkdtemp(prefix="loop_time_")
  os.makedirs(out, exist_ok=True)
  print(f"loop_time: {cpu_model()}, {os.cpu_count()} cores; config {args.config} "
        f"{' '.join(overrides)}; output in {out}", flush=True)
  results, worktree = {}, None
  try:
    if args.base != "none":
      worktree = os.path.join(out, "base_checkout")
      subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", worktree, args.base],
                     check=True, capture_output=True)
      rev = subprocess.run(["git", "-C", worktree, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, check=True).stdout.strip()
      print(f"loop_time: base {rev} ...", flush=True)
      results["base"] = run_loop(worktree, os.path.join(out, "wd_base"), args.config,
                                 overrides, os.path.join(out, "base.log"))
    # A snapshot of the working tree (tracked and untracked, not ignored
    # files): edits made while the runs go on do not leak into them.
    tree = snapshot_tree(os.path.join(out, "tree_checkout"))
    print(f"loop_time: working tree (snapshot in {tree}) ...", flush=True)
    results["tree"] = run_loop(tree, os.path.join(out, "wd_tree"), args.config, overrides,
                               os.path.join(out, "tree.log"))
  finally:
    if worktree:
      subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", worktree],
                     check=False, capture_output=True)
  names = [n for n in results]
  stages = [s for s in STAGE_ORDER if any(s in r["stages"] for r in results.values())]
  stages += sorted({s for r in results.values() for s in r["stages"]} - set(stages))
  print(f"{'stage':10s}" + "".join(f"{n:>12s}" for n in names)
        + ("       ratio" if len(names) == 2 else ""))
  for s in stages:
    vals = [results[n]["stages"].get(s) for n in names]
    row = f"{s:10s}" + "".join(f"{v:12.1f}" if v is not None else f"{'-':>12s}" for v in vals)
    if len(names) == 2 and all(vals) and vals[1] > 0:
      row += f"{vals[0] / vals[1]:12.2f}"
    print(row)
  totals = [sum(results[n]["stages"].values()) for n in names]
  print(f"{'total':10s}" + "".join(f"{v:12.1f}" for v in totals)
        + (f"{totals[0] / totals[1]:12.2f}" if len(names) == 2 and totals[1] > 0 else ""))
  print(f"{'process':10s}" + "".join(f"{results[n]['wall_s']:12.1f}" for n in names))
  with open(os.path.join(out, "loop_time.json"), "w") as f:
    json.dump({"cpu": cpu_model(), "results": results, "config": args.config,
               "overrides": overrides, "base": args.base}, f, indent=1)
  if not args.out and not args.keep:
    shutil.rmtree(out, ignore_errors=True)
  if len(names) == 2:
    print(f"speedup vs base: {totals[0] / totals[1]:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
