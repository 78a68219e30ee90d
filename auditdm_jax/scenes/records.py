"""Scene records with PNG-encoded images, as the scene dataset builder
(`scenes/tfds.py`) writes them.

Kept apart from `tfds` on purpose: the build's worker processes are started
with "spawn" and import only this module (numpy, PIL and the scene world),
not tensorflow_datasets.
"""

from __future__ import annotations

from auditdm_jax.data.records import encode_png
from auditdm_jax.scenes import examples


def encoded_record(seed: int, index: int) -> dict:
  """`examples.example(seed, index)` with the image as PNG bytes, plus the
  record's `index` (its position in the split)."""
  record = examples.example(seed, index)
  record["image"] = encode_png(record["image"])
  record["index"] = index
  return record


def encoded_record_star(seed_index: tuple[int, int]) -> dict:
  """`encoded_record(*seed_index)`, for `multiprocessing.Pool.imap`."""
  return encoded_record(*seed_index)
