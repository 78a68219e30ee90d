"""The per-sample predictions journal of named-benchmark evaluation.

Evaluation writes every model's answers as it goes, so that a crash or a
SIGTERM loses at most the chunk in progress, a restart predicts only what is
missing, and the same weights evaluated again (rectify's "before", then the
eval stage) reuse the predictions without a second pass:

  <root>/<fingerprint>/<benchmark>/<settings>/
      settings.json          what the predictions were made with
      chunk-000000.jsonl     one line per record: {"id", "prompt", "prediction"}
      chunk-000001.jsonl     ...

root: `<workdir>/eval_cache/predictions`; fingerprint: the model's parameters
(`utils.digest.params_fingerprint`: any training step changes it, a re-saved
copy keeps it), so a changed model never reads another model's predictions;
benchmark: the config's name of the benchmark; settings: a digest of the
generation settings (greedy, max_new_tokens). A line is keyed by the record's
id (its question_id, else its index) and carries a digest of the prompt the
model read: a record whose prompt changed is predicted again. Each chunk is
written atomically (temporary file, fsync, rename: `utils.fileio`), so a chunk
file is either whole or absent; a later chunk overrides an earlier one for
the same id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence

from auditdm_jax.utils.fileio import atomic_write_text

_CHUNK = re.compile(r"^chunk-(\d{6})\.jsonl$")


def prompt_digest(prompt: str) -> str:
  return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def settings_digest(settings: dict) -> str:
  return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _safe(name: str) -> str:
  if not name or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in (".", ".."):
    raise ValueError(f"predictions journal: {name!r} is not a usable directory name "
                     "(letters, digits, '_', '.', '+', '-')")
  return name


class Journal:
  """The predictions of one model (by fingerprint) on one benchmark with one
  set of generation settings."""

  def __init__(self, root: str, fingerprint: str, benchmark: str, settings: dict):
    self.settings = dict(settings)
    self.dir = os.path.join(root, _safe(fingerprint), _safe(benchmark),
                            settings_digest(self.settings))

  def chunk_files(self) -> list[str]:
    if not os.path.isdir(self.dir):
      return []
    return sorted(os.path.join(self.dir, f) for f in os.listdir(self.dir) if _CHUNK.match(f))

  def lines(self) -> list[dict]:
    """Every line of every chunk, in order (the test counts them per id)."""
    out = []
    for path in self.chunk_files():
      with open(path) as f:
        out += [json.loads(line) for line in f if line.strip()]
    return out

  def predictions(self) -> dict[str, tuple[str, str]]:
    """{id: (prompt digest, prediction)}; a later chunk overrides an earlier one."""
    return {row["id"]: (row["prompt"], row["prediction"]) for row in self.lines()}

  def write_chunk(self, rows: Sequence[dict]) -> str:
    """Appends one chunk ({"id", "prompt", "prediction"} rows) atomically."""
    os.makedirs(self.dir, exist_ok=True)
    settings = os.path.join(self.dir, "settings.json")
    if not os.path.exists(settings):
      atomic_write_text(settings, json.dumps(self.settings, indent=2, sort_keys=True))
    files = self.chunk_files()
    n = int(_CHUNK.match(os.path.basename(files[-1])).group(1)) + 1 if files else 0
    path = os.path.join(self.dir, f"chunk-{n:06d}.jsonl")
    atomic_write_text(path, "".join(json.dumps({"id": r["id"], "prompt": r["prompt"],
                                                "prediction": r["prediction"]}) + "\n"
                                    for r in rows))
    return path


def predict(journal: Journal | None, records: Sequence[dict],
            generate: Callable[[Sequence[dict]], list[str]], chunk: int, *,
            write: bool = True, after_chunk: Callable[[int, int], None] | None = None
            ) -> tuple[list[str], int]:
  """Predictions of every record ({"id", "prompt", ...}), in order, and how
  many were predicted now (the rest came from the journal). The records not in
  the journal (or whose prompt changed) are predicted in order, `chunk` at a
  time, each chunk journaled (by this process when `write`) before the next
  starts; after_chunk(done, total) runs after each (a SIGTERM check). With no
  journal, everything is predicted."""
  ids = [str(r["id"]) for r in records]
  if len(set(ids)) != len(ids):
    dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
    raise ValueError(f"the benchmark's record ids repeat ({dup}); give every record a "
                     "distinct question_id")
  digests = [prompt_digest(r["prompt"]) for r in records]
  have = journal.predictions() if journal is not None else {}
  out: dict[str, str] = {}
  todo = []
  for i, rid, d in zip(range(len(records)), ids, digests):
    hit = have.get(rid)
    if hit is not None and hit[0] == d:
      out[rid] = hit[1]
    else:
      todo.append(i)
  for start in range(0, len(todo), chunk):
    part = todo[start:start + chunk]
    preds = generate([records[i] for i in part])
    if len(preds) != len(part):
      raise ValueError(f"generate returned {len(preds)} predictions for {len(part)} records")
    rows = [{"id": ids[i], "prompt": digests[i], "prediction": p} for i, p in zip(part, preds)]
    if journal is not None and write:
      journal.write_chunk(rows)
    out.update({r["id"]: r["prediction"] for r in rows})
    if after_chunk is not None:
      after_chunk(start + len(part), len(todo))
  return [out[i] for i in ids], len(todo)


def count_ids(lines: Iterable[dict]) -> dict[str, int]:
  """How often each id was journaled (1 everywhere: nothing predicted twice)."""
  out: dict[str, int] = {}
  for row in lines:
    out[row["id"]] = out.get(row["id"], 0) + 1
  return out
