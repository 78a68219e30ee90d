"""The mined-exemplar store: journaled chunks, published as a TFDS array_record dataset.

Mining writes probes in chunks; every chunk is one JSON-lines file written
atomically (`write_chunk`), so a crash mid-mine loses no chunk already written
and a restart skips the chunks that exist. `publish` then turns all chunks into
a TFDS dataset (array_record, no TensorFlow) with two splits:

  exemplars        the references agree and at least one target differs:
                   the failure exemplars (`failed` names the targets)
  pseudo_labelled  the references agree and every target agrees with them:
                   consensus-labelled data for bootstrapping

Features: seed_image / image (PNG, the seed and the image the models saw),
id, pairing, route, auditor_text, auditor_text2, question, pseudo_label
(a reference's answer that carries the consensus), answers (JSON
{model: answer}), failed (JSON [target]), skill, factor, category, context
(the editor's context of the image: scene JSON in the scene world), auditor
(checkpoint name), auditor_step, seed_index (int64).

The dataset is built in a temporary sibling directory and renamed over the
previous one, so readers see either the old or the new store, never a torn one.

    path = publish(chunks_dir, data_dir)
    src = data_source(path, "exemplars")     # random access, decoded records
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from auditdm_jax.data.records import decode_png, encode_png
from auditdm_jax.utils.fileio import atomic_write_text, error_code, replace_dir, write_failed
from auditdm_jax.utils import chaos

NAME = "auditdm_exemplars"
VERSION = "1.0.0"
SPLITS = ("exemplars", "pseudo_labelled")
TEXT = ("id", "pairing", "route", "auditor_text", "auditor_text2", "question",
        "pseudo_label", "answers", "failed", "skill", "factor", "category", "context",
        "auditor")
INTS = ("auditor_step", "seed_index")
IMAGES = ("seed_image", "image")
FIELDS = TEXT + INTS + IMAGES


def _check(record: dict, where: str) -> None:
  missing = [k for k in FIELDS if k not in record]
  if missing:
    raise ValueError(f"{where}: missing fields {missing}")
  for k in IMAGES:
    a = np.asarray(record[k])
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
      raise ValueError(f"{where}: {k} must be a uint8 [H, W, 3] image, "
                       f"got {a.dtype} {list(a.shape)}")
  for k in ("answers", "failed"):
    if not isinstance(record[k], (dict, list)):
      raise TypeError(f"{where}: {k} must be a dict/list, got {type(record[k]).__name__}")


def split_of(record: dict) -> str:
  return "exemplars" if record["failed"] else "pseudo_labelled"


# -- chunks -------------------------------------------------------------------------

def chunk_path(chunks_dir: str, tag: str, index: int) -> str:
  return os.path.join(chunks_dir, f"{tag}-{index:05d}.jsonl")


def write_chunk(path: str, records: Sequence[dict]) -> None:
  """All of a chunk's records, atomically (an empty chunk is written too: it
  marks the chunk done)."""
  lines = []
  for i, r in enumerate(records):
    _check(r, f"chunk {os.path.basename(path)} record {i}")
    row = {k: r[k] for k in TEXT + INTS}
    row["answers"] = r["answers"]
    row["failed"] = list(r["failed"])
    if r.get("descriptor"):      # the journal keeps it; the TFDS features do not
      row["descriptor"] = str(r["descriptor"])
    for k in IMAGES:
      row[k] = base64.b64encode(encode_png(np.asarray(r[k]))).decode("ascii")
    lines.append(json.dumps(row) + "\n")
  atomic_write_text(path, "".join(lines))


def read_chunk(path: str) -> list[dict]:
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        for k in IMAGES:
          row[k] = decode_png(base64.b64decode(row[k]))
      except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"corrupt exemplar chunk {path}, line {n}: "
                         f"{type(e).__name__}: {e}") from None
      out.append(row)
  return out


def chunk_files(chunks_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(chunks_dir, "*.jsonl")))


def iter_chunks(chunks_dir: str) -> Iterable[dict]:
  for path in chunk_files(chunks_dir):
    yield from read_chunk(path)


# -- the TFDS dataset -----------------------------------------------------------------

class AuditdmExemplars(tfds.core.GeneratorBasedBuilder):
  """The published store (TFDS name `auditdm_exemplars`); `chunks_dir` names the
  journal it is built from."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES: ClassVar[dict[str, str]] = {str(VERSION): "AuditDM mined exemplars."}

  def __init__(self, *, chunks_dir: str = "", **kwargs):
    self._chunks_dir = chunks_dir
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)   # see scenes/tfds.py: TFDS 4.9.10 needs a backport otherwise

  def _info(self) -> tfds.core.DatasetInfo:
    # Any size: the scene world's 48 x 48, or real seed images at the auditor's resolution.
    img = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
    return tfds.core.DatasetInfo(
        builder=self,
        description="Probes of a trained AuditDM auditor labelled by the reference "
                    "consensus (no human labels).",
        features=tfds.features.FeaturesDict({
            **{k: img for k in IMAGES},
            **{k: tfds.features.Text() for k in TEXT},
            **{k: tfds.features.Scalar(np.int64) for k in INTS}}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    counts = {s: 0 for s in SPLITS}
    for r in iter_chunks(self._chunks_dir):
      counts[split_of(r)] += 1
    return {s: self._generate_examples(s) for s in SPLITS if counts[s]}

  def _generate_examples(self, split: str):
    for r in iter_chunks(self._chunks_dir):
      if split_of(r) != split:
        continue
      row = {k: r[k] for k in TEXT + INTS}
      row["answers"] = json.dumps(r["answers"], sort_keys=True)
      row["failed"] = json.dumps(r["failed"])
      for k in IMAGES:
        row[k] = encode_png(np.asarray(r[k]))
      yield r["id"], row


def publish(chunks_dir: str, data_dir: str) -> str:
  """Builds the dataset from every chunk into data_dir (replacing a previous
  build atomically); returns its version directory. A failed build (a full
  disk, a read-only directory) removes `<data_dir>.building` and raises an
  OSError (errno kept) naming data_dir (other errors, such as a corrupt chunk,
  pass through); the previously published store stays as it was."""
  data_dir = os.path.abspath(data_dir)
  tmp = data_dir + ".building"
  try:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
    tfds.disable_progress_bar()
    builder = AuditdmExemplars(chunks_dir=chunks_dir, data_dir=tmp)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception as e:
    shutil.rmtree(tmp, ignore_errors=True)
    what = f"publishing the exemplar store {data_dir} failed while building it in {tmp}"
    kept = (f"the previously published store {data_dir} is intact and {tmp} was removed"
            if os.path.exists(data_dir) else f"nothing was published and {tmp} was removed")
    if error_code(e) is not None:   # a write failed (not a bad chunk: that error stays)
      raise write_failed(e, what, kept) from e
    raise
  chaos.point("store_built")
  try:
    replace_dir(tmp, data_dir, "store_moved_aside")   # the previous store is put back on failure
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):
      raise write_failed(e, f"publishing the exemplar store {data_dir} failed (moving {tmp} "
                            "into place)",
                         f"the previously published store {data_dir} (if any) is intact and "
                         f"{tmp} was removed") from e
    raise
  return os.path.join(data_dir, NAME, VERSION)


def decode(record: dict) -> dict:
  out = {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in record.items()}
  for k in IMAGES:
    out[k] = np.asarray(out[k], dtype=np.uint8)
  for k in INTS:
    out[k] = int(out[k])
  out["answers"] = json.loads(out["answers"])
  out["failed"] = json.loads(out["failed"])
  return out


class ExemplarSource:
  """Random access over one split of a published store (decoded records);
  an absent split (no records of that kind) is empty. Picklable."""

  def __init__(self, path: str, split: str):
    if split not in SPLITS:
      raise ValueError(f"unknown exemplar split {split!r}; splits are {SPLITS}")
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
      raise FileNotFoundError(f"no published exemplar store at {path} (run the mine stage)")
    self.path, self.split = path, split
    builder = tfds.builder_from_directory(path)
    self._source = (builder.as_data_source(split=split) if split in builder.info.splits
                    else [])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    return decode(self._source[i])

  def __getitems__(self, indices) -> list[dict]:
    return [self[i] for i in indices]


def data_source(path: str, split: str) -> ExemplarSource:
  return ExemplarSource(path, split)
