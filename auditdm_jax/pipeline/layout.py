"""The one home of the workdir's layout and of the names derived from models.

  <workdir>/models/<name>/          every model (our Orbax format)
  <workdir>/models/<auditor>_trained   the GRPO-trained auditor (audit)
  <workdir>/models/<target>_rectified  the rectified target (rectify)
  <workdir>/data/                   the scene world's TFDS data (pretrain)
  <workdir>/mine/chunks, mine/tfds  the exemplar journal and store (mine)
  <workdir>/mine_earlier/r<k>       round k's store, linked in later rounds
  <workdir>/rounds/r<r>/            round r >= 2 of audit -> mine -> rectify
  <workdir>/<summary>.json          each stage's summary (SUMMARIES) and the
                                    stages' wall-clock record (stages.json)

Also the config's roles (which models are targets, references, the auditor),
the audited target, and the seed-image and scene-data sources every stage
opens the same way.
"""

from __future__ import annotations

import glob
import json
import os
import time

from auditdm_jax import sharding
from auditdm_jax.data import exemplars_tfds as store
from auditdm_jax.data import named
from auditdm_jax.scenes import tfds as scene_tfds
from auditdm_jax.utils.fileio import atomic_write_text

ROLES = ("target", "reference", "auditor")
ANSWERER_ROLES = ("target", "reference")
TRAINED_SUFFIX = "_trained"
RECTIFIED_SUFFIX = "_rectified"
EARLIER_STORES = "mine_earlier"   # <round workdir>/mine_earlier/r<k>: round k's store
ROUNDS = "rounds"


# Each stage's summary file in a (round) workdir; "stages": seconds per stage.
SUMMARIES = {"init": "models.json", "pretrain": "pretrain.json", "eval": "eval.json",
             "audit": "audit.json", "mine": "mine.json", "rectify": "rectify.json",
             "report": "report.json", "stages": "stages.json"}


def summary_path(workdir: str, stage: str) -> str:
  if stage not in SUMMARIES:
    raise KeyError(f"no summary file for stage {stage!r}; known: {sorted(SUMMARIES)}")
  return os.path.join(workdir, SUMMARIES[stage])


def write_summary(workdir: str, stage: str, text: str) -> str:
  """Writes the stage's summary (JSON text) atomically; returns its path."""
  path = summary_path(workdir, stage)
  atomic_write_text(path, text)
  return path


def read_summary(workdir: str, stage: str, default=None):
  """The stage's summary as written, or `default` when the stage has not
  written one; a summary that is not JSON is refused by path and stage."""
  path = summary_path(workdir, stage)
  if not os.path.exists(path):
    return default
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"the {stage} stage's summary {path} is not valid JSON ({e}); "
                     f"remove it and run the {stage} stage again") from e


def model_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "models", name)


def load_model(workdir: str, name: str, who: str,
               hint: str = "run the init and pretrain stages first", path: str | None = None):
  """The model `name` of the workdir (or at `path`) as a `models.VLM`, or a
  FileNotFoundError that names the stage asking (`who`), the model, the
  path and what to run (`hint`)."""
  from auditdm_jax import models  # pylint: disable=import-outside-toplevel
  path = path or model_dir(workdir, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{who}: model {name!r} has no checkpoint at {path}; {hint}")
  return models.load(path)


def trained_name(auditor: str) -> str:
  """The GRPO-trained auditor's model name."""
  return auditor + TRAINED_SUFFIX


def is_trained_name(name: str) -> bool:
  return name.endswith(TRAINED_SUFFIX)


def rectified_name(target: str) -> str:
  """The rectified target's model name."""
  return target + RECTIFIED_SUFFIX


def roles(config, role: str) -> list[str]:
  return sorted(n for n, s in config.models.items() if s.role == role)


def audit_target(config) -> str:
  targets = roles(config, "target")
  name = config.audit.get("target", "") or (targets[0] if targets else "")
  if name not in targets:
    raise ValueError(f"audit.target {name!r} is not a model with role 'target' "
                     f"(targets: {targets})")
  return name


def store_paths(workdir: str) -> tuple[str, str]:
  """(chunk journal, TFDS store root) of the mine stage."""
  root = os.path.join(workdir, "mine")
  return os.path.join(root, "chunks"), os.path.join(root, "tfds")


def published_path(workdir: str) -> str:
  """The published exemplar store of a workdir."""
  return os.path.join(store_paths(workdir)[1], store.NAME, store.VERSION)


def earlier_stores(workdir: str) -> list[str]:
  """The exemplar stores of earlier rounds (`<workdir>/mine_earlier/r<k>`,
  linked by `rounds.prepare_round`), oldest first; [] in round 1."""
  root = os.path.join(workdir, EARLIER_STORES)
  if not os.path.isdir(root):
    return []
  names = sorted((n for n in os.listdir(root) if n.startswith("r") and n[1:].isdigit()),
                 key=lambda n: int(n[1:]))
  out = [os.path.join(root, n) for n in names]
  for p in out:
    if not os.path.exists(os.path.join(p, "dataset_info.json")):
      raise FileNotFoundError(f"rectify: the earlier round's exemplar store {p} is missing")
  return out


def round_dir(workdir: str, r: int) -> str:
  """The workdir of round r (round 1 is the main workdir)."""
  return workdir if r == 1 else os.path.join(workdir, ROUNDS, f"r{r}")


def round_dirs(workdir: str) -> list[str]:
  """Workdirs of rounds 2.. (`rounds/r2`, ...), in order."""
  dirs = glob.glob(os.path.join(workdir, ROUNDS, "r*"))
  return sorted((d for d in dirs if os.path.basename(d)[1:].isdigit()),
                key=lambda d: int(os.path.basename(d)[1:]))


# The scene world's data.


def is_scene_model(spec) -> bool:
  return bool(spec.get("preset", "")) and spec.preset.startswith("scene-") and \
      not spec.get("checkpoint", "")


def data_sizes(config) -> dict:
  w = config.world
  return {"train_size": int(w.train_size), "benchmark_size": int(w.benchmark_size),
          "seed_images_size": int(w.get("seed_images_size", 0))}


def data_dir(config, workdir: str) -> str:
  return config.world.get("data_dir", "") or os.path.join(workdir, "data")


def ensure_data(config, workdir: str):
  """Builds the scene data (process 0) unless it is built; returns its dir."""
  d = data_dir(config, workdir)
  sizes = data_sizes(config)
  if sharding.is_primary() and not scene_tfds.is_built(d, **sizes):
    t0 = time.time()
    scene_tfds.build(d, **sizes, num_workers=int(config.world.get("build_workers", 1)))
    print(f"pretrain: built the scene dataset in {d} ({sizes['train_size']} train, "
          f"{sizes['benchmark_size']} benchmark) in {time.time() - t0:.0f}s", flush=True)
  sharding.barrier(f"auditdm scene data {d}")   # process 0 built it; the others read it
  return d


def scene_source(config, workdir: str, split: str):
  """A split of the scene data (random access)."""
  return scene_tfds.data_source(data_dir(config, workdir), split, **data_sizes(config))


def seed_source(config, workdir: str, image_size: int):
  """The seed images: `data.seed_images` (a named TFDS / jsonl dataset, read
  at `image_size`) when the config names one, else the scene world's
  `seed_images` split (built if missing)."""
  spec = config.get("data", {}).get("seed_images", None)
  if spec:
    return named.open_source(dict(spec), image_size)
  ensure_data(config, workdir)
  return scene_source(config, workdir, "seed_images")
