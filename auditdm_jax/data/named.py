"""Seed images and benchmarks of real runs, named in the config.

A dataset spec (a dict / ConfigDict) is one of

  TFDS, read with `tfds.data_source` (array_record builds; no TensorFlow):
    {"kind": "tfds", "name": "coco_captions", "split": "val", "data_dir": "gs://b/tfds",
     "image_key": "image", "question_key": "question", "answer_key": "answer"}

  big_vision-style JSON lines, one example per line, with the image as a file
  name relative to `image_dir` (default: the jsonl file's directory):
    {"kind": "jsonl", "path": "gs://b/vqav2/val.jsonl", "image_dir": "",
     "image_key": "image", "question_key": "prefix", "answer_key": "suffix"}
    -> lines like {"image": "COCO_val2014_000000000042.jpg",
                   "prefix": "answer en what is on the plate?", "suffix": "pizza"}

Every path may be local or a URL (gs://...). `open_source(spec, image_size)`
gives a random-access source of records {"image": uint8 [S, S, 3],
"question": str, "answer": str ("" when the dataset has none), "index": int};
`problems(spec, where)` names what is missing or malformed (the config check
calls it before any model is built). Both read only metadata and the jsonl
text; images are decoded and resized when a record is read.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from auditdm_jax.utils import fileio

KINDS = ("tfds", "jsonl")
DEFAULT_KEYS = {"tfds": ("image", "question", "answer"),
                "jsonl": ("image", "prefix", "suffix")}
_KNOWN = {"tfds": {"kind", "name", "split", "data_dir", "image_key", "question_key",
                   "answer_key"},
          "jsonl": {"kind", "path", "image_dir", "image_key", "question_key", "answer_key"}}


def _keys(spec: Mapping[str, Any]) -> tuple[str, str, str]:
  d = DEFAULT_KEYS[spec["kind"]]
  return (spec.get("image_key", "") or d[0], spec.get("question_key", "") or d[1],
          spec.get("answer_key", "") or d[2])


def describe(spec: Mapping[str, Any]) -> str:
  if spec.get("kind") == "tfds":
    return (f"TFDS {spec.get('name')!r} split {spec.get('split')!r}"
            + (f" in {spec.get('data_dir')}" if spec.get("data_dir") else ""))
  return f"jsonl {spec.get('path')!r}"


def problems(spec: Mapping[str, Any] | None, where: str, *, check_exists: bool = True
             ) -> list[str]:
  """Everything wrong with a dataset spec; with check_exists, also whether the
  data is named and there (a TFDS build that opens; a jsonl file, and the
  image of its first line)."""
  if not isinstance(spec, Mapping) and not hasattr(spec, "items"):
    return [f"{where} must be a dataset spec (dict with 'kind': {KINDS}), got {spec!r}"]
  spec = dict(spec)
  kind = spec.get("kind", None)
  if kind not in KINDS:
    return [f"{where}.kind is {kind!r}; expected one of {KINDS}"]
  out = []
  bad = sorted(set(spec) - _KNOWN[kind])
  if bad:
    out.append(f"{where}: unknown keys {bad} for kind {kind!r}; known: {sorted(_KNOWN[kind])}")
  if out or not check_exists:
    return out
  need = ("name", "split") if kind == "tfds" else ("path",)
  missing = [k for k in need if not spec.get(k, "")]
  if missing:   # an input not given (e.g. a real config without data_dir=...)
    return [f"{where}: {kind} datasets need {list(need)}; {missing} not given"]
  try:
    if kind == "tfds":
      _tfds_source(spec)
    else:
      lines = _jsonl_lines(spec["path"], limit=1)
      if not lines:
        return [f"{where}: {spec['path']} has no examples"]
      ex = _parse_line(lines[0], spec, 1)
      path = _image_path(spec, ex)
      if not fileio.exists(path):
        return [f"{where}: the first example's image {path} does not exist"]
  except FileNotFoundError as e:
    return [f"{where}: {describe(spec)} not found: {e}"]
  except (ValueError, KeyError, RuntimeError, OSError) as e:
    return [f"{where}: {describe(spec)}: {e}"]
  return out


def _tfds_source(spec: Mapping[str, Any]):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  kw = {"data_dir": spec["data_dir"]} if spec.get("data_dir") else {}
  try:
    return tfds.data_source(spec["name"], split=spec["split"], **kw)
  except Exception as e:  # tfds raises many kinds for "not prepared"
    if isinstance(e, FileNotFoundError):
      raise
    raise FileNotFoundError(f"{describe(spec)} cannot be opened ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); prepare it as an "
                            "array_record build first") from e


def _jsonl_lines(path: str, limit: int | None = None) -> list[str]:
  if not fileio.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  out = []
  with fileio.open_read(path, "rb") as f:
    for raw in f:
      line = raw.decode("utf-8").strip()
      if line:
        out.append(line)
        if limit is not None and len(out) >= limit:
          break
  return out


def _parse_line(line: str, spec: Mapping[str, Any], lineno: int) -> dict:
  try:
    ex = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{spec['path']} line {lineno} is not JSON: {e}") from e
  if not isinstance(ex, dict):
    raise ValueError(f"{spec['path']} line {lineno} is not a JSON object")
  image_key, question_key, _ = _keys(spec)
  for key in (image_key, question_key):
    if not isinstance(ex.get(key, None), str):
      raise ValueError(f"{spec['path']} line {lineno} has no string {key!r} "
                       f"(keys: {sorted(ex)})")
  return ex


def _image_path(spec: Mapping[str, Any], ex: Mapping[str, Any]) -> str:
  name = ex[_keys(spec)[0]]
  if fileio.is_remote(name) or name.startswith("/"):
    return name
  base = spec.get("image_dir", "") or spec["path"].rsplit("/", 1)[0]
  return fileio.join(base, name)


def decode_image(data: bytes | np.ndarray, size: int | None, what: str) -> np.ndarray:
  """Encoded bytes (or an array) -> uint8 [size, size, 3] RGB (bilinear)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if isinstance(data, np.ndarray):
    img = Image.fromarray(np.asarray(data, np.uint8).squeeze())
  else:
    try:
      img = Image.open(io.BytesIO(data))
      img.load()
    except Exception as e:  # PIL raises several kinds for bad data
      raise ValueError(f"{what}: not a readable image ({e})") from e
  img = img.convert("RGB")
  if size and img.size != (size, size):
    img = img.resize((size, size), Image.BILINEAR)
  return np.asarray(img, np.uint8)


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, (list, tuple, np.ndarray)) and len(value):
    return _text(value[0])   # several reference answers: the first
  return "" if value is None else str(value)


class JsonlSource:
  """Random access over a jsonl dataset (the lines are read once, images on
  access)."""

  def __init__(self, spec: Mapping[str, Any], image_size: int | None):
    self.spec, self.image_size = dict(spec), image_size
    self.examples = [_parse_line(line, self.spec, i + 1)
                     for i, line in enumerate(_jsonl_lines(self.spec["path"]))]
    if not self.examples:
      raise ValueError(f"{self.spec['path']} has no examples")

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i: int) -> dict:
    ex = self.examples[int(i)]
    path = _image_path(self.spec, ex)
    try:
      with fileio.open_read(path, "rb") as f:
        data = f.read()
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{self.spec['path']} example {i}: image {path} does not "
                              "exist") from e
    _, qk, ak = _keys(self.spec)
    return {"image": decode_image(data, self.image_size, path), "question": ex[qk],
            "answer": _text(ex.get(ak, "")), "index": int(i)}


class TfdsSource:
  def __init__(self, spec: Mapping[str, Any], image_size: int | None):
    self.spec, self.image_size = dict(spec), image_size
    self.src = _tfds_source(self.spec)

  def __len__(self) -> int:
    return len(self.src)

  def __getitem__(self, i: int) -> dict:
    r = self.src[int(i)]
    ik, qk, ak = _keys(self.spec)
    if ik not in r:
      raise KeyError(f"{describe(self.spec)} has no feature {ik!r} (features: {sorted(r)})")
    return {"image": decode_image(r[ik], self.image_size, f"{describe(self.spec)} [{i}]"),
            "question": _text(r.get(qk, "")), "answer": _text(r.get(ak, "")), "index": int(i)}


def open_source(spec: Mapping[str, Any], image_size: int | None = None):
  """The dataset of `spec` as records of image_size x image_size images."""
  bad = problems(spec, "dataset", check_exists=False)
  need = ("name", "split") if spec.get("kind") == "tfds" else ("path",)
  bad += [f"dataset: {k!r} not given" for k in need if not bad and not spec.get(k, "")]
  if bad:
    raise ValueError("; ".join(bad))
  return (TfdsSource if spec["kind"] == "tfds" else JsonlSource)(spec, image_size)
