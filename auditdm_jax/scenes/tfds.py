"""The scene VQA dataset as a TFDS builder writing array_record, without TF.

Splits (records from `auditdm_jax.scenes.examples`, seeds in SPLIT_SEEDS):
  train        the pretraining / fine-tuning pool
  benchmark    held out (its own seed stream); skills interleave round-robin,
               so every skill is present once benchmark_size >= len(SKILLS)
  seed_images  optional (size 0 leaves it out): the auditor's seed images
Record i of a split is stored at position i (shuffling at write time is off;
loaders shuffle), and carries `index` = i, so it can always be regenerated
with `examples.example(SPLIT_SEEDS[split], i)` and compared.

Features: image (PNG, uint8 [48, 48, 3]), question / answer / skill / facets /
scene (Text), index (int64).

Split sizes live in a BuilderConfig whose name spells them out
(`train50000_benchmark2000_seed_images0`), so builds of different sizes sit
side by side in one data_dir: <data_dir>/scene_vqa/<config name>/1.0.0/.

    path = build(data_dir, train_size=50_000, benchmark_size=2_000)
    train = data_source(data_dir, "train", 50_000, 2_000)
    train[0]  # {"image": uint8 [48, 48, 3], "question": str, ..., "index": 0}

Without TensorFlow (only tensorflow-datasets, array_record, PIL installed):
  * file_format must be "array_record" (tfrecord writing needs TF); the
    records are serialized tf.train.Example protos all the same (TFDS ships
    them as tensorflow_datasets.proto.tf_example_pb2), and read back with `tfds.data_source` / PIL.
  * images must be given to the Image feature already encoded (PNG bytes or
    PIL images): numpy images are encoded with TF ops.
  * `builder.as_dataset()` (tf.data) is unavailable; use `data_source`.
  * TFDS 4.9.10's `DatasetBuilder.code_path` imports `importlib_resources`
    (a backport it only requires on Python < 3.9) for builders defined in a
    package; SceneVQA overrides `code_path`.

Completeness: TFDS writes a build into `<config dir>/incomplete.<random>_1.0.0`
and renames it to `<config dir>/1.0.0` when done (deleting it on an
exception), so a crash never leaves a version directory behind. `build` and
`data_source` check more than the directory's existence anyway (the info file,
each split's size, each shard's record count), so a half-copied or truncated
directory is never read as finished: `build` replaces it, `data_source`
refuses it.

Multi-host: call `build` on one process (or once per host on local disks) and
wait on a barrier before reading; concurrent builds of the same config into
one shared data_dir are not coordinated.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from auditdm_jax.scenes import examples, questions, records
from auditdm_jax.scenes.world import IMAGE_SIZE

NAME = "scene_vqa"
VERSION = "1.0.0"
FILE_FORMAT = "array_record"
TEXT_FEATURES = ("question", "answer", "skill", "facets", "scene")
SPLITS = ("train", "benchmark", "seed_images")
assert set(SPLITS) == set(examples.SPLIT_SEEDS), "SPLITS out of sync with examples"


@dataclasses.dataclass(eq=False)
class SceneVQAConfig(tfds.core.BuilderConfig):
  """Split sizes of one build; make it with `make_config` (validated, named)."""
  train_size: int = 0
  benchmark_size: int = 0
  seed_images_size: int = 0

  def split_sizes(self) -> dict[str, int]:
    """{split: size} of the splits this build has (size-0 splits left out)."""
    sizes = {"train": self.train_size, "benchmark": self.benchmark_size,
             "seed_images": self.seed_images_size}
    return {k: v for k, v in sizes.items() if v > 0}


def _check_size(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
  if value < minimum:
    why = (f" so that every one of the {len(questions.SKILLS)} skills is present"
           if name == "benchmark_size" else "")
    raise ValueError(f"{name} must be >= {minimum}{why}, got {value}")
  return int(value)


def config_name(train_size: int, benchmark_size: int, seed_images_size: int = 0) -> str:
  return f"train{train_size}_benchmark{benchmark_size}_seed_images{seed_images_size}"


def make_config(train_size: int, benchmark_size: int,
                seed_images_size: int = 0) -> SceneVQAConfig:
  """A validated config; raises ValueError (TypeError for a non-int) naming
  the bad size."""
  train_size = _check_size("train_size", train_size, 1)
  benchmark_size = _check_size("benchmark_size", benchmark_size, len(questions.SKILLS))
  seed_images_size = _check_size("seed_images_size", seed_images_size, 0)
  return SceneVQAConfig(
      name=config_name(train_size, benchmark_size, seed_images_size),
      description=(f"{train_size} train, {benchmark_size} benchmark, "
                   f"{seed_images_size} seed_images records"),
      train_size=train_size, benchmark_size=benchmark_size,
      seed_images_size=seed_images_size)


class SceneVQA(tfds.core.GeneratorBasedBuilder):
  """Scene VQA records (see the module docstring). Needs `config=make_config(...)`;
  `num_workers` > 1 renders in that many spawned processes."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
      str(VERSION): "Scene world v1: 48x48 images, 8 skills."}

  def __init__(self, *, config: SceneVQAConfig | None = None, num_workers: int = 1,
               **kwargs):
    if not isinstance(config, SceneVQAConfig):
      raise TypeError("SceneVQA needs config=make_config(train_size, benchmark_size, "
                      f"seed_images_size), got config={config!r}")
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    self._num_workers = int(num_workers)
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(config=config, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 computes this with the `importlib_resources` backport, which
    # it only depends on for Python < 3.9 (ModuleNotFoundError otherwise).
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    text = {k: tfds.features.Text() for k in TEXT_FEATURES}
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Procedural scene VQA for AuditDM: one question per "
                     "rendered scene, exact one-word answers, 8 skills."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                         encoding_format="png"),
            **text,
            "index": tfds.features.Scalar(np.int64),
        }),
        # Record i at position i: keeps splits regenerable and comparable;
        # the Grain loaders shuffle.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, size)
            for split, size in self.builder_config.split_sizes().items()}

  def _generate_examples(self, split: str, size: int):
    seed = examples.SPLIT_SEEDS[split]
    if self._num_workers == 1:
      for i in range(size):
        yield i, records.encoded_record(seed, i)
      return
    # "spawn": the caller may have JAX (threads) loaded, where fork is unsafe.
    ctx = multiprocessing.get_context("spawn")
    chunk = max(1, min(256, size // (4 * self._num_workers)))
    with ctx.Pool(self._num_workers) as pool:
      work = ((seed, i) for i in range(size))
      for i, record in enumerate(pool.imap(records.encoded_record_star, work, chunk)):
        yield i, record


def dataset_path(data_dir: epath.PathLike, config: SceneVQAConfig) -> epath.Path:
  """<data_dir>/scene_vqa/<config name>/<version>: where a build lives."""
  return epath.Path(data_dir) / NAME / config.name / VERSION


def incomplete_reason(path: epath.PathLike, config: SceneVQAConfig) -> str | None:
  """None if `path` holds a finished build of `config`, else what is wrong."""
  path = epath.Path(path)
  if not path.exists():
    return f"{path} does not exist"
  if not (path / "dataset_info.json").exists():
    return f"{path} has no dataset_info.json"
  try:
    info = tfds.builder_from_directory(os.fspath(path)).info
  except Exception as e:  # noqa: BLE001  (any failure: not finished)
    return f"{path}: unreadable dataset info ({type(e).__name__}: {e})"
  if FILE_FORMAT not in {f.value for f in info.available_file_formats()}:
    return f"{path} is not in {FILE_FORMAT} format"
  for split, size in config.split_sizes().items():
    if split not in info.splits:
      return f"{path} has no split {split!r}"
    split_info = info.splits[split]
    if split_info.num_examples != size:
      return (f"split {split!r} has {split_info.num_examples} records, "
              f"expected {size}")
    for file, length in zip(split_info.filepaths, split_info.shard_lengths, strict=True):
      if not file.exists():
        return f"missing shard {file}"
      try:
        n = tfds.core.file_adapters.ArrayRecordFileAdapter.num_examples(file)
      except Exception as e:  # noqa: BLE001  (any failure: not finished)
        return f"unreadable shard {file} ({type(e).__name__}: {e})"
      if n != length:
        return f"shard {file} has {n} records, expected {length}"
  return None


def is_built(data_dir: epath.PathLike, train_size: int, benchmark_size: int,
             seed_images_size: int = 0) -> bool:
  config = make_config(train_size, benchmark_size, seed_images_size)
  return incomplete_reason(dataset_path(data_dir, config), config) is None


def build(data_dir: epath.PathLike, train_size: int, benchmark_size: int,
          seed_images_size: int = 0, *, num_workers: int = 1) -> epath.Path:
  """Builds the splits into data_dir (array_record) unless a finished build of
  these sizes is there already; returns the dataset's version directory.

  An unfinished directory for these sizes (missing info or shards, wrong
  counts) is deleted and rebuilt. num_workers > 1 renders and PNG-encodes in
  that many "spawn" processes (call it under `if __name__ == "__main__":` in
  scripts); the calling process still encodes, serializes and writes, about
  0.5 ms a record, which caps the speed near 2000 records/s. One process:
  ~900 records/s (50k train records in 55 s on a shared 2-core box).
  TFDS writes into a temporary sibling directory and renames it at the end,
  so an interrupted build leaves no version directory.
  """
  config = make_config(train_size, benchmark_size, seed_images_size)
  path = dataset_path(data_dir, config)
  reason = incomplete_reason(path, config)
  if reason is None:
    logging.info("scene_vqa: reusing %s", path)
    return path
  if path.exists():
    logging.warning("scene_vqa: replacing an unfinished build (%s)", reason)
    path.rmtree()
  start = time.perf_counter()
  builder = SceneVQA(data_dir=os.fspath(data_dir), config=config, num_workers=num_workers)
  builder.download_and_prepare(
      file_format=FILE_FORMAT,
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  reason = incomplete_reason(path, config)
  if reason is not None:
    raise RuntimeError(f"scene_vqa build of {config.name} did not complete: {reason}")
  total = sum(config.split_sizes().values())
  seconds = time.perf_counter() - start
  logging.info("scene_vqa: built %d records in %.1f s (%.0f records/s) at %s",
               total, seconds, total / seconds, path)
  return path


def decode_record(record: dict) -> dict:
  """A data_source record with bytes -> str and the image as uint8 numpy."""
  out = {}
  for key, value in record.items():
    if isinstance(value, bytes):
      value = value.decode("utf-8")
    out[key] = value
  out["image"] = np.asarray(out["image"], dtype=np.uint8)
  out["index"] = int(out["index"])
  return out


class SceneSource:
  """A random-access split (len, [i], Grain's RandomAccessDataSource protocol)
  yielding decoded records: image uint8 [48, 48, 3], text fields as str,
  index as int. Picklable, so Grain worker processes can use it."""

  def __init__(self, source: Sequence[dict], split: str):
    self._source = source
    self.split = split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return decode_record(self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [decode_record(r) for r in self._source.__getitems__(indices)]

  def __repr__(self) -> str:
    return f"SceneSource(split={self.split!r}, len={len(self)})"


def data_source(data_dir: epath.PathLike, split: str, train_size: int,
                benchmark_size: int, seed_images_size: int = 0) -> SceneSource:
  """The finished build of these sizes in data_dir, one split, via
  `tfds.data_source`; raises FileNotFoundError if it is not (fully) built."""
  config = make_config(train_size, benchmark_size, seed_images_size)
  if split not in config.split_sizes():
    raise ValueError(f"split {split!r} is not in build {config.name}; "
                     f"its splits are {sorted(config.split_sizes())}")
  path = dataset_path(data_dir, config)
  reason = incomplete_reason(path, config)
  if reason is not None:
    raise FileNotFoundError(
        f"no finished scene_vqa build {config.name} in {data_dir}: {reason}. "
        "Run auditdm_jax.scenes.tfds.build(...) first.")
  source = tfds.data_source(f"{NAME}/{config.name}:{VERSION}", split=split,
                            data_dir=os.fspath(data_dir), download=False)
  return SceneSource(source, split)

