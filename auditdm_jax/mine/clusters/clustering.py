"""Clustering the exemplars (HDBSCAN) and assigning the other probes to the
nearest cluster within its radius."""

from __future__ import annotations

import numpy as np



def cluster(x: np.ndarray, min_cluster_size: int = 5, min_samples: int = 0) -> np.ndarray:
  """int [N] cluster labels of HDBSCAN (-1: noise), renumbered 0.. by size
  (largest first, ties by first member)."""
  from sklearn.cluster import HDBSCAN  # pylint: disable=import-outside-toplevel
  x = np.asarray(x, np.float64)
  if len(x) < max(min_cluster_size, 2):
    return np.full(len(x), -1, int)
  labels = HDBSCAN(min_cluster_size=int(min_cluster_size),
                   min_samples=int(min_samples) or None, copy=True).fit_predict(x)
  ids = [c for c in dict.fromkeys(labels.tolist()) if c >= 0]
  order = sorted(ids, key=lambda c: (-int((labels == c).sum()), int(np.argmax(labels == c))))
  remap = {c: i for i, c in enumerate(order)}
  return np.array([remap.get(int(c), -1) for c in labels], int)


def centroids(x: np.ndarray, labels: np.ndarray, scale: float = 1.25
              ) -> tuple[np.ndarray, np.ndarray]:
  """(centroids [K, D], radii [K]: `scale` x the members' largest distance)."""
  k = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
  cents = np.stack([x[labels == c].mean(0) for c in range(k)]) if k else np.zeros((0, x.shape[1]))
  radii = np.array([scale * np.linalg.norm(x[labels == c] - cents[c], axis=1).max()
                    for c in range(k)])
  return cents, radii


def assign(x: np.ndarray, cents: np.ndarray, radii: np.ndarray) -> np.ndarray:
  """int [N]: the nearest centroid's cluster when within its radius, else -1."""
  if not len(cents) or not len(x):
    return np.full(len(x), -1, int)
  out = np.empty(len(x), int)
  for start in range(0, len(x), 4096):       # [rows, K, D] stays small
    xs = x[start:start + 4096]
    d = np.linalg.norm(xs[:, None, :] - cents[None], axis=-1)
    near = d.argmin(1)
    out[start:start + len(xs)] = np.where(d[np.arange(len(xs)), near] <= radii[near], near, -1)
  return out
