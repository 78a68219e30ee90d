"""Scene records with PNG-encoded images, as the dataset builder writes them.

Kept apart from `scene_tfds` on purpose: the build's worker processes are
started with "spawn" and import only this module (numpy, PIL and the scene
world), not tensorflow_datasets.

PNG is lossless, so `decode_png(encode_png(x))` equals `x` bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from auditdm_jax.scenes import examples


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} "
                     f"{list(image.shape)}")
  buf = io.BytesIO()
  Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
  """PNG bytes -> uint8 [H, W, 3]."""
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


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
