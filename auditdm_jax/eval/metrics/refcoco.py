"""RefCOCO/+/g: PaliGemma location tokens, box IoU, Acc@0.5."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from auditdm_jax.eval.metrics.common import check_prediction


_LOC_BOX = re.compile(r"<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>")
LOC_BINS = 1024


def _image_wh(image_size) -> tuple[float, float]:
  if (isinstance(image_size, (int, float, np.integer, np.floating))
      and not isinstance(image_size, bool)):
    w = h = float(image_size)
  elif isinstance(image_size, Sequence) and len(image_size) == 2:
    w, h = (float(v) for v in image_size)
  else:
    raise ValueError(f"image_size must be (width, height) or one int, got {image_size!r}")
  if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
    raise ValueError(f"image_size must be positive, got {image_size!r}")
  return w, h


def decode_loc_box(prediction: str, image_size) -> tuple[float, float, float, float] | None:
  """The first box a PaliGemma answer names, as (x1, y1, x2, y2) in pixels,
  or None. A box is four consecutive `<locNNNN>` tokens in the order y1, x1,
  y2, x2, each one of 1024 bins over the image height or width; as
  big_vision decodes them (the PaliGemma segmentation/detection evaluator)
  bin v is the normalised coordinate v / 1023 (the encoder rounds c * 1023),
  then scaled by the image size. The box is invalid (None) when a bin is
  outside 0..1023 or when y2 <= y1 or x2 <= x1, as big_vision rejects it.
  (Dividing by 1024, as some model cards do, moves coordinates by < 0.1%.)
  `image_size` is (width, height) in pixels, or one int for a square."""
  prediction = check_prediction(prediction)
  w, h = _image_wh(image_size)
  m = _LOC_BOX.search(prediction)
  if m is None:
    return None
  y1, x1, y2, x2 = (int(g) for g in m.groups())
  if max(y1, x1, y2, x2) >= LOC_BINS or y2 <= y1 or x2 <= x1:
    return None
  scale = LOC_BINS - 1
  return (x1 / scale * w, y1 / scale * h, x2 / scale * w, y2 / scale * h)


def box_iou(a, b) -> float:
  """IoU of two (x1, y1, x2, y2) boxes."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _coco_box(box) -> tuple[float, float, float, float]:
  if isinstance(box, np.ndarray):
    box = box.tolist()
  if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
    raise ValueError(f"box must be [x, y, width, height] (COCO, pixels), got {box!r}")
  x, y, bw, bh = (float(v) for v in box)
  if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw <= 0 or bh <= 0:
    raise ValueError(f"box {box!r} must be finite with positive width and height")
  return (x, y, x + bw, y + bh)


def refcoco_accuracy(prediction: str, box, image_size, iou_threshold: float = 0.5) -> float:
  """RefCOCO/+/g referring-expression localisation, Acc@0.5: 1.0 when the
  box the answer names (`decode_loc_box`) has IoU >= 0.5 with the gold box
  (big_vision's `boxacc/0.5`), else 0.0; an answer with no valid box is 0.0.

  `box` is the COCO/RefCOCO annotation: [x, y, width, height] in pixels of
  the original image, top-left origin (a list, tuple or array of 4 numbers).
  `image_size` is that image's (width, height), or one int for a square.
  (IoU does not change when both boxes are rescaled per axis, so computing it
  in pixels equals big_vision's computation in normalised coordinates.)"""
  gold = _coco_box(box)
  pred = decode_loc_box(prediction, image_size)
  if pred is None:
    return 0.0
  return float(box_iou(pred, gold) >= iou_threshold)
