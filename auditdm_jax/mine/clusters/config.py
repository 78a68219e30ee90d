"""The unlabelled path's settings (`mine.unlabelled`): defaults and checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np



DEFAULTS = dict(
    image_weight=0.5, text_weight=1.0, dims=16, pca_rows=20_000,   # embedding
    min_cluster_size=5, min_samples=0, radius_scale=1.25,          # clustering (0: HDBSCAN's)
    namers=("question",), name_top=8, name_show=4, name_samples=2, name_candidates=4,
    name_members=24, name_nonmembers=48, name_margin=0.3, name_tokens=16,
    batch=64, seed=0)
NAMERS = ("question", "chat")
DESCRIPTIVE = "descriptive"

Ask = Callable[[np.ndarray, Sequence[str]], list[str]]   # images, questions -> consensus ("" none)


def settings(given: Mapping | None = None) -> dict:
  s = dict(DEFAULTS)
  s.update(dict(given or {}))
  s["namers"] = tuple(s["namers"])
  return s


def problems(given: Mapping | None, where: str = "mine.unlabelled") -> list[str]:
  """What is wrong with a settings dict (unknown keys, bad values)."""
  given = dict(given or {})
  out = [f"{where}: unknown key {k!r} (known: {sorted(DEFAULTS)})"
         for k in given if k not in DEFAULTS]
  s = settings({k: v for k, v in given.items() if k in DEFAULTS})
  for k in ("dims", "pca_rows", "min_cluster_size", "name_show", "name_samples",
            "name_candidates", "name_members", "name_nonmembers", "name_tokens", "batch"):
    v = s[k]
    if isinstance(v, bool) or not isinstance(v, int) or v < (2 if k == "min_cluster_size" else 1):
      out.append(f"{where}.{k} must be an int >= {2 if k == 'min_cluster_size' else 1}, got {v!r}")
  for k in ("name_top", "min_samples", "seed"):
    if isinstance(s[k], bool) or not isinstance(s[k], int) or s[k] < 0:
      out.append(f"{where}.{k} must be an int >= 0, got {s[k]!r}")
  for k in ("image_weight", "text_weight"):
    if not isinstance(s[k], (int, float)) or not np.isfinite(s[k]) or s[k] < 0:
      out.append(f"{where}.{k} must be a finite number >= 0, got {s[k]!r}")
  if not out and s["image_weight"] + s["text_weight"] <= 0:
    out.append(f"{where}: image_weight and text_weight are both 0")
  if not isinstance(s["name_margin"], (int, float)) or not 0 < s["name_margin"] <= 1:
    out.append(f"{where}.name_margin must be in (0, 1], got {s['name_margin']!r}")
  if not isinstance(s["radius_scale"], (int, float)) or not 0 <= s["radius_scale"] < np.inf:
    out.append(f"{where}.radius_scale must be a finite number >= 0 (0: exemplars only), "
               f"got {s['radius_scale']!r}")
  bad = [n for n in s["namers"] if n not in NAMERS]
  if bad:
    out.append(f"{where}.namers: unknown {bad} (known: {list(NAMERS)})")
  return out
