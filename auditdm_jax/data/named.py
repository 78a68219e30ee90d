r"""Seed images and benchmarks of real runs, named in the config.

A dataset spec (a dict / ConfigDict) is one of

  TFDS, read with `tfds.data_source` (array_record builds; no TensorFlow):
    {"kind": "tfds", "name": "coco_captions", "split": "val", "data_dir": "gs://b/tfds",
     "image_key": "image", "question_key": "question", "answer_key": "answer"}

  big_vision-style JSON lines, one example per line, with the image as a file
  name relative to `image_dir` (default: the jsonl file's directory):
    {"kind": "jsonl", "path": "gs://b/vqav2/val.jsonl", "image_dir": "",
     "image_key": "image", "question_key": "prefix", "answer_key": "suffix"}
    -> lines like {"image": "COCO_val2014_000000000042.jpg",
                   "prefix": "what is on the plate?", "suffix": "pizza"}

A benchmark's spec also declares its `metric` (a key of METRIC_FIELDS:
"exact", "vqa", "anls", "relaxed", "choice", "circular", "pope", "mme",
"refcoco", "cider"; scored by `eval/metrics/`) and may give a `prompt`
template (below) and `max_new_tokens` (its answer length; 0: the eval
default). Seed images and labelled data declare no metric.

The jsonl layout, one object per line (the keys are the defaults; each is
renamed by its spec key, e.g. `options_key`; TFDS features are named the same
way, nested features as "objects/bbox"):

  image        str   file name (relative to image_dir, or absolute / a URL)    [image_key]
  prefix       str   the question (or the caption / referring expression)   [question_key]
  suffix       str | [str]  the reference answer(s): every annotator's answer
                     (VQAv2's ten), every caption (COCO), the correct option
                     (a letter "B" or the option's text), "yes" / "no" (POPE, MME) [answer_key]
  question_id  str | int  the record's id (default: its line number - 1)  [question_id_key]
  image_id     str | int  the image's id (MME pairs two questions per image;
                     CIDEr's references are per image)                      [image_id_key]
  category     str   POPE's split (random / popular / adversarial), MME's
                     subtask, a benchmark's category                         [category_key]
  subcategory  str                                                        [subcategory_key]
  options      [str] | {letter: str}   multiple-choice options, in letter order [options_key]
  box          [4 numbers]   RefCOCO's box of the referred object as COCO
                     writes it: [x, y, width, height] in pixels of the
                     original image                                           [box_key]
  group        str | int  MMBench's circular group: the rotations of one
                     question share it                                        [group_key]

Today's `{"image", "prefix", "suffix"}` lines read as before (`answer` is the
first reference, `answers` all of them; `suffix` may be a string or a list).
A record missing a field its metric needs (METRIC_FIELDS), a multiple-choice
answer that names no option, or a POPE / MME answer other than yes / no is
refused by name when the dataset is opened (every jsonl line; a TFDS
build's first record, as its features are the same for every record), and
by `problems` (the first line / record) in the config check, before any
model runs.

Prompts: `prompt` is a template over {question} and {options} (the options as
lettered lines "A. cat\nB. dog"); default "{question}", and for the
multiple-choice metrics "{question}\n{options}". A question that already
starts with the template's text before {question} (a big_vision prefix such as
"answer en ...") is not prefixed twice; a template without {question}
("caption en") needs no question in the records.

Every path may be local or a URL (gs://...). `open_source(spec, image_size)`
gives a random-access source of records {"image": uint8 [S, S, 3],
"image_size": [width, height] of the original image, "question": str,
"prompt": str, "answer": str (the first reference; "" when the dataset has
none), "answers": [str], "index": int, "id": str (question_id, else the
index)} plus the optional fields above that the record has; `meta(i)` is
record i without its image (and with "image_size" only for RefCOCO, whose
boxes are in the original image's pixels). `problems(spec, where)` names
what is missing or malformed (the config check calls it before any model is
built). Both read only metadata and the jsonl text; images are decoded and
resized when a record is read.
"""

from __future__ import annotations

import io
import json
import math
import string
from collections.abc import Mapping
from typing import Any

import numpy as np

from auditdm_jax.utils import fileio

KINDS = ("tfds", "jsonl")
# The record fields beyond image and question, each read from the spec's key
# `<field>_key` ("answers" from `answer_key`), and their default names.
FIELDS = ("answers", "question_id", "image_id", "category", "subcategory", "options", "box",
          "group")
FIELD_KEY = {f: ("answer_key" if f == "answers" else f"{f}_key") for f in FIELDS}
DEFAULT_KEYS = {
    "tfds": {"image": "image", "question": "question", "answers": "answer",
             **{f: f for f in FIELDS[1:]}},
    "jsonl": {"image": "image", "question": "prefix", "answers": "suffix",
              **{f: f for f in FIELDS[1:]}},
}
# The one table of what each metric (eval/metrics/) needs of a record.
METRIC_FIELDS = {
    "exact": ("answers",),                            # GQA: normalised exact match
    "vqa": ("answers",),                              # VQAv2, OK-VQA: ten-annotator score
    "anls": ("answers",),                             # DocVQA
    "relaxed": ("answers",),                          # ChartQA: 5% numeric tolerance
    "choice": ("options", "answers"),                 # AI2D, SEED-Bench, MMStar, MMMU, ...
    "circular": ("options", "answers", "group"),      # MMBench: every rotation right
    "pope": ("answers",),                             # yes / no (per POPE split: category)
    "mme": ("answers", "category", "image_id"),       # acc + acc+ (both of an image's pair)
    "refcoco": ("box",),                              # IoU >= 0.5 of the decoded box
    "cider": ("answers", "image_id"),                 # COCO captions, references per image
}
CHOICE_METRICS = ("choice", "circular")
LETTERS = string.ascii_uppercase
YES_NO_METRICS = ("pope", "mme")
_COMMON = {"metric", "prompt", "max_new_tokens", "image_key", "question_key",
           *FIELD_KEY.values()}
_KNOWN = {"tfds": {"kind", "name", "split", "data_dir"} | _COMMON,
          "jsonl": {"kind", "path", "image_dir"} | _COMMON}


def _keys(spec: Mapping[str, Any]) -> dict[str, str]:
  """{field: source key} of a spec (image, question and FIELDS)."""
  d = DEFAULT_KEYS[spec["kind"]]
  out = {"image": spec.get("image_key", "") or d["image"],
         "question": spec.get("question_key", "") or d["question"]}
  for f in FIELDS:
    out[f] = spec.get(FIELD_KEY[f], "") or d[f]
  return out


def metric_of(spec: Mapping[str, Any]) -> str:
  """The benchmark's metric ("" for a dataset that is not a benchmark)."""
  return str(spec.get("metric", "") or "")


def needed_fields(spec: Mapping[str, Any]) -> tuple[str, ...]:
  """The record fields the spec's metric (and its prompt) need."""
  need = list(METRIC_FIELDS.get(metric_of(spec), ()))
  if "options" in _template_fields(prompt_template(spec)) and "options" not in need:
    need.append("options")
  return tuple(need)


def prompt_template(spec: Mapping[str, Any]) -> str:
  t = spec.get("prompt", "") or ""
  if t:
    return str(t)
  return "{question}\n{options}" if metric_of(spec) in CHOICE_METRICS else "{question}"


def _asks_question(spec: Mapping[str, Any]) -> bool:
  """Whether the prompt reads the record's question (a captioning prompt such
  as "caption en" does not, and then a record needs none)."""
  return "question" in _template_fields(prompt_template(spec))


def _template_fields(template: str) -> set[str]:
  return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def lettered(options) -> str:
  """["cat", "dog"] -> "A. cat\\nB. dog"."""
  return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def make_prompt(template: str, question: str, options=None) -> str:
  """The model's prompt of a record (module docstring)."""
  head = template.split("{question}", 1)[0].strip() if "{question}" in template else ""
  if head and "{" not in head and question.startswith(head):
    question = question[len(head):].lstrip()
  return template.format(question=question, options=lettered(options or ()))


def describe(spec: Mapping[str, Any]) -> str:
  if spec.get("kind") == "tfds":
    return (f"TFDS {spec.get('name')!r} split {spec.get('split')!r}"
            + (f" in {spec.get('data_dir')}" if spec.get("data_dir") else ""))
  return f"jsonl {spec.get('path')!r}"


def _spec_problems(spec: dict, where: str) -> list[str]:
  """What is wrong with the spec itself (no data read)."""
  kind = spec["kind"]
  out = []
  bad = sorted(set(spec) - _KNOWN[kind])
  if bad:
    out.append(f"{where}: unknown keys {bad} for kind {kind!r}; known: {sorted(_KNOWN[kind])}")
  metric = metric_of(spec)
  if metric and metric not in METRIC_FIELDS:
    out.append(f"{where}.metric is {metric!r}; expected one of {sorted(METRIC_FIELDS)}")
  for k in ("image_key", "question_key", *FIELD_KEY.values(), "prompt"):
    if k in spec and not isinstance(spec[k], str):
      out.append(f"{where}.{k} must be a string, got {spec[k]!r}")
  template = spec.get("prompt", "") or ""
  if isinstance(template, str) and template:
    try:
      names = _template_fields(template)
      if not names <= {"question", "options"}:
        out.append(f"{where}.prompt {template!r} may use only {{question}} and "
                   f"{{options}}; it uses {sorted(names)}")
      else:
        make_prompt(template, "q", ["a", "b"])
    except (ValueError, IndexError, KeyError) as e:
      out.append(f"{where}.prompt {template!r} is not a valid template: {e!r}")
  n = spec.get("max_new_tokens", 0)
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    out.append(f"{where}.max_new_tokens must be an int >= 0 (0: the eval default), got {n!r}")
  return out


def problems(spec: Mapping[str, Any] | None, where: str, *, check_exists: bool = True
             ) -> list[str]:
  """Everything wrong with a dataset spec; with check_exists, also whether the
  data is named and there (a TFDS build that opens and whose first record has
  the fields its metric needs; a jsonl file, its first line's fields, and the
  image of its first line)."""
  if not isinstance(spec, Mapping) and not hasattr(spec, "items"):
    return [f"{where} must be a dataset spec (dict with 'kind': {KINDS}), got {spec!r}"]
  spec = dict(spec)
  kind = spec.get("kind", None)
  if kind not in KINDS:
    return [f"{where}.kind is {kind!r}; expected one of {KINDS}"]
  out = _spec_problems(spec, where)
  if out or not check_exists:
    return out
  need = ("name", "split") if kind == "tfds" else ("path",)
  missing = [k for k in need if not spec.get(k, "")]
  if missing:   # an input not given (e.g. a real config without data_dir=...)
    return [f"{where}: {kind} datasets need {list(need)}; {missing} not given"]
  try:
    if kind == "tfds":
      src = _tfds_source(spec)
      if len(src):
        _tfds_fields(spec, src[0], 0)
    else:
      lines = _jsonl_lines(spec["path"], limit=1)
      if not lines:
        return [f"{where}: {spec['path']} has no examples"]
      ex = _parse_line(lines[0], spec, 1)
      _jsonl_fields(spec, ex, 1)
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
  keys = _keys(spec)
  need = [keys["image"]] + ([keys["question"]] if _asks_question(spec) else [])
  for key in need:
    if not isinstance(ex.get(key, None), str):
      raise ValueError(f"{spec['path']} line {lineno} has no string {key!r} "
                       f"(keys: {sorted(ex)})")
  return ex


def _image_path(spec: Mapping[str, Any], ex: Mapping[str, Any]) -> str:
  name = ex[_keys(spec)["image"]]
  if fileio.is_remote(name) or name.startswith("/"):
    return name
  base = spec.get("image_dir", "") or spec["path"].rsplit("/", 1)[0]
  return fileio.join(base, name)


def decode_image(data: bytes | np.ndarray, size: int | None, what: str,
                 with_size: bool = False):
  """Encoded bytes (or an array) -> uint8 [size, size, 3] RGB (bilinear); with
  `with_size`, (image, [width, height] before resizing)."""
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
  wh = [img.size[0], img.size[1]]
  if size and img.size != (size, size):
    img = img.resize((size, size), Image.BILINEAR)
  out = np.asarray(img, np.uint8)
  return (out, wh) if with_size else out


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _text(value.item())
  if isinstance(value, (list, tuple, np.ndarray)) and len(value):
    return _text(value[0])   # several reference answers: the first
  return "" if value is None else str(value)


def _texts(value) -> list[str]:
  """A string or a list of strings (bytes from TFDS) -> [str]."""
  if value is None:
    return []
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_text(v) for v in value]
  return [_text(value)]


def _lookup(ex: Mapping[str, Any], key: str):
  """ex[key], with "a/b" reaching into nested features; None when absent."""
  if key in ex:
    return ex[key]
  node: Any = ex
  for part in key.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  return node


def _field(field: str, value, what: str):
  """A source value -> the record's field (None: absent)."""
  if value is None:
    return None
  if field == "answers":
    return _texts(value) or None
  if field == "options":
    if isinstance(value, Mapping):    # {"A": ..., "B": ...} (MMBench's columns)
      value = [value[k] for k in sorted(value) if value[k] not in (None, "")]
    out = _texts(value)
    if len(out) > len(LETTERS):
      raise ValueError(f"{what}: {len(out)} options; at most {len(LETTERS)}")
    return out or None
  if field == "box":
    try:
      box = [float(v) for v in np.asarray(value, np.float64).reshape(-1)]
    except (TypeError, ValueError) as e:
      raise ValueError(f"{what}: box {value!r} is not 4 numbers") from e
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
      raise ValueError(f"{what}: box {value!r} is not 4 finite numbers")
    return box
  text = _text(value)
  return text if text != "" else None


def _fields(spec: Mapping[str, Any], ex: Mapping[str, Any], what: str) -> dict:
  """The FIELDS of one source example that it has; the metric's are required,
  and a multiple-choice answer must name an option, a yes / no metric's answer
  be yes or no."""
  keys = _keys(spec)
  out = {}
  for f in FIELDS:
    v = _field(f, _lookup(ex, keys[f]), what)
    if v is not None:
      out[f] = v
  metric = metric_of(spec)
  missing = [f for f in needed_fields(spec) if f not in out]
  if missing:
    names = ", ".join(f"{f!r} (key {keys[f]!r})" for f in missing)
    raise ValueError(f"{what} has no {names}, which metric {metric!r} needs "
                     f"(keys: {sorted(ex)})")
  if metric in CHOICE_METRICS:
    options, answer = out["options"], out["answers"][0].strip()
    if not ((len(answer) == 1 and answer.upper() in LETTERS[:len(options)])
            or sum(o.strip() == answer for o in options) == 1):
      raise ValueError(f"{what}: answer {answer!r} is neither an option letter "
                       f"({LETTERS[0]}-{LETTERS[len(options) - 1]}) nor one option's text "
                       f"(options: {options!r})")
  if metric in YES_NO_METRICS and out["answers"][0].strip().lower() not in ("yes", "no"):
    raise ValueError(f"{what}: answer {out['answers'][0]!r} is not 'yes' or 'no', which "
                     f"metric {metric!r} needs")
  return out


def _jsonl_fields(spec, ex, lineno: int) -> dict:
  return _fields(spec, ex, f"{spec['path']} line {lineno}")


def _tfds_fields(spec, r, i: int) -> dict:
  return _fields(spec, r, f"{describe(spec)} [{i}]")


def _needs_size(spec) -> bool:
  """Whether the metric reads the original image size (RefCOCO's boxes)."""
  return metric_of(spec) == "refcoco"


def _image_wh(data) -> list[int]:
  """[width, height] of an encoded image (its header only) or an array."""
  if isinstance(data, np.ndarray):
    return [int(data.shape[1]), int(data.shape[0])]
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(data)) as img:
    return [int(img.size[0]), int(img.size[1])]


def _record(spec, question: str, fields: dict, i: int, image=None, wh=None) -> dict:
  answers = fields.get("answers", [])
  rec = {} if image is None else {"image": image}
  if wh is not None:
    rec["image_size"] = list(wh)
  rec.update({"question": question,
              "prompt": make_prompt(prompt_template(spec), question, fields.get("options")),
              "answer": answers[0] if answers else "", "answers": list(answers),
              "index": int(i), "id": str(fields.get("question_id", i))})
  rec.update({k: v for k, v in fields.items() if k != "answers"})
  return rec


class JsonlSource:
  """Random access over a jsonl dataset (the lines are read, and every line's
  fields checked, once; images on access)."""

  def __init__(self, spec: Mapping[str, Any], image_size: int | None):
    self.spec, self.image_size = dict(spec), image_size
    self.examples = [_parse_line(line, self.spec, i + 1)
                     for i, line in enumerate(_jsonl_lines(self.spec["path"]))]
    if not self.examples:
      raise ValueError(f"{self.spec['path']} has no examples")
    self.fields = [_jsonl_fields(self.spec, ex, i + 1) for i, ex in enumerate(self.examples)]
    unique = ["question_id"] + (["image_id"] if metric_of(self.spec) == "cider" else [])
    for field in unique:   # record ids (the predictions journal); CIDEr's images
      seen: dict[str, int] = {}
      for i, f in enumerate(self.fields):
        if field in f:
          if f[field] in seen:
            raise ValueError(f"{self.spec['path']} line {i + 1}: {field} {f[field]!r} "
                             f"repeats line {seen[f[field]] + 1}")
          seen[f[field]] = i

  def __len__(self) -> int:
    return len(self.examples)

  def _question(self, i: int) -> str:
    return str(self.examples[i].get(_keys(self.spec)["question"], "") or "")

  def _read(self, i: int) -> bytes:
    path = _image_path(self.spec, self.examples[i])
    try:
      with fileio.open_read(path, "rb") as f:
        return f.read()
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{self.spec['path']} example {i}: image {path} does not "
                              "exist") from e

  def meta(self, i: int) -> dict:
    """Record i without its image (what scoring reads; "image_size" only when
    the metric needs it)."""
    i = int(i)
    wh = _image_wh(self._read(i)) if _needs_size(self.spec) else None
    return _record(self.spec, self._question(i), self.fields[i], i, wh=wh)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    image, wh = decode_image(self._read(i), self.image_size,
                             _image_path(self.spec, self.examples[i]), with_size=True)
    return _record(self.spec, self._question(i), self.fields[i], i, image=image, wh=wh)


class TfdsSource:
  def __init__(self, spec: Mapping[str, Any], image_size: int | None):
    self.spec, self.image_size = dict(spec), image_size
    self.src = _tfds_source(self.spec)
    if len(self.src):   # the features are the same for every record
      _tfds_fields(self.spec, self.src[0], 0)

  def __len__(self) -> int:
    return len(self.src)

  def _image(self, r, i: int):
    keys = _keys(self.spec)
    img = _lookup(r, keys["image"])
    if img is None:
      raise KeyError(f"{describe(self.spec)} has no feature {keys['image']!r} "
                     f"(features: {sorted(r)})")
    return img

  def meta(self, i: int) -> dict:
    i = int(i)
    r = self.src[i]
    wh = _image_wh(self._image(r, i)) if _needs_size(self.spec) else None
    return _record(self.spec, _text(_lookup(r, _keys(self.spec)["question"])),
                   _tfds_fields(self.spec, r, i), i, wh=wh)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    r = self.src[i]
    image, wh = decode_image(self._image(r, i), self.image_size,
                             f"{describe(self.spec)} [{i}]", with_size=True)
    return _record(self.spec, _text(_lookup(r, _keys(self.spec)["question"])),
                   _tfds_fields(self.spec, r, i), i, image=image, wh=wh)


def open_source(spec: Mapping[str, Any], image_size: int | None = None):
  """The dataset of `spec` as records of image_size x image_size images; a
  record without a field its metric needs is refused here, by name."""
  bad = problems(spec, "dataset", check_exists=False)
  need = ("name", "split") if spec.get("kind") == "tfds" else ("path",)
  bad += [f"dataset: {k!r} not given" for k in need if not bad and not spec.get(k, "")]
  if bad:
    raise ValueError("; ".join(bad))
  return (TfdsSource if spec["kind"] == "tfds" else JsonlSource)(spec, image_size)
