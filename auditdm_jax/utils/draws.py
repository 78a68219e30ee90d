"""Systematic sampling of n labels in given proportions: each label's count is
floor or ceil of n x p (unbiased), then the n labels are shuffled. One uniform
draw and one permutation of `rng` per call."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def systematic_counts(weights: Mapping[str, float], n: int, rng: np.random.Generator
                      ) -> dict[str, int]:
  """{label: count} of n, in proportion to `weights` (> 0 in all; the caller
  checks them), labels in sorted order."""
  names = sorted(weights)
  cum = np.concatenate([[0.0], np.cumsum([weights[k] for k in names])])
  cum = cum / cum[-1] * n
  edges = np.floor(cum + float(rng.random())).astype(int)
  edges[0], edges[-1] = 0, n
  return {k: int(edges[i + 1] - edges[i]) for i, k in enumerate(names)}


def systematic_draw(weights: Mapping[str, float], n: int, rng: np.random.Generator
                    ) -> list[str]:
  """n labels by `systematic_counts`, shuffled."""
  out = [k for k, c in systematic_counts(weights, n, rng).items() for _ in range(c)]
  return [out[i] for i in rng.permutation(n)]
