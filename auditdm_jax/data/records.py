"""Images as PNG bytes, as the dataset builders write them.

Kept apart from the TFDS builders on purpose: the scene build's worker
processes (started with "spawn", `auditdm_jax.scenes.records`) import it
without tensorflow_datasets.

PNG is lossless, so `decode_png(encode_png(x))` equals `x` bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


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
