"""Embedding the probes: SigLIP image and LLM text features of one model
(`Embedder`), centred, reduced and weighted into one matrix (`combine`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax import sharding
from auditdm_jax.models.inputs import fit_images


def probe_text(record: Mapping) -> str:
  """The text the LLM embeds: question, consensus answer and, when the
  auditor's first text was an edit or a caption, that text."""
  parts = [record["question"], record["pseudo_label"]]
  if record.get("route") in ("edit", "caption") and record.get("auditor_text"):
    parts.append(record["auditor_text"])
  return " ".join(str(p).strip() for p in parts if str(p).strip())



def _pooled_image(module, images):
  return module.img(images).astype(jnp.float32).mean(axis=1)


class Embedder:
  """Pooled SigLIP features and LLM states of one VLM, each one jitted function.

  module: the model's flax module (`models.build(config)`, passed in: mine
  does not import the model layer); params: its parameters (host or already
  placed); tokenizer; family: "paligemma" or "gemma3"; image_size. Rows go
  in fixed batches of `batch` (the last padded) and token rows in buckets of
  16, so a store embeds with a few compilations. With `mesh`, inputs are
  placed replicated on it (several processes pass the same rows)."""

  def __init__(self, module, params, tokenizer, family: str, image_size: int,
               batch: int = 64, mesh=None):
    if family not in ("paligemma", "gemma3"):
      raise ValueError(f"unknown model family {family!r}")
    if tokenizer is None:
      raise ValueError("the embedding model has no tokenizer")
    self.tokenizer, self.family, self.size, self.batch = tokenizer, family, image_size, batch
    self.mesh = mesh
    self.params = params if mesh is not None else jax.device_put(params)
    self._image_fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method=_pooled_image))

    def text_fn(p, images, tokens, mask):
      if family == "paligemma":
        h = module.apply({"params": p}, images, tokens, mask, jnp.zeros_like(tokens),
                         return_hidden=True).hidden[:, -tokens.shape[1]:]
      else:
        h = module.apply({"params": p}, None, tokens, mask, return_hidden=True).hidden
      w = mask[..., None].astype(jnp.float32)
      return (h.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    self._text_fn = jax.jit(text_fn)

  @classmethod
  def from_sampler(cls, sampler, build, batch: int = 64) -> "Embedder":
    """The model of a `sampling.Sampler` (its placed params, mesh and
    tokenizer); `build` = `models.build`."""
    cfg = sampler.cfg
    return cls(build(cfg), sampler.params, sampler.tokenizer, cfg.family,
               cfg.vision.image_size, batch, sampler.mesh)

  @classmethod
  def from_handle(cls, handle, build, batch: int = 64) -> "Embedder":
    """A loaded `models.VLM` handle; `build` = `models.build`."""
    cfg = handle.config
    return cls(build(cfg), handle.params, handle.tokenizer, cfg.family,
               cfg.vision.image_size, batch)

  def _put(self, *xs):
    if self.mesh is None:
      return xs
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
    rep = NamedSharding(self.mesh, PartitionSpec())
    return tuple(jax.device_put(np.asarray(x), rep) for x in xs)

  def _batches(self, n: int):
    for start in range(0, n, self.batch):
      stop = min(start + self.batch, n)
      yield start, stop, list(range(start, stop)) + [start] * (self.batch - (stop - start))

  def images(self, images) -> np.ndarray:
    """float32 [N, D]: the tower's output tokens, averaged, per image."""
    images = fit_images(np.asarray(images, np.uint8), self.size)
    out = []
    for start, stop, idx in self._batches(len(images)):
      (x,) = self._put(images[idx])
      out.append(sharding.to_host(self._image_fn(self.params, x))[:stop - start])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def texts(self, texts: Sequence[str], images=None) -> np.ndarray:
    """float32 [N, D]: the LLM's final hidden states, averaged over each text's
    tokens (BOS + text). PaliGemma needs `images` (the prefix it reads first)."""
    if self.family == "paligemma" and images is None:
      raise ValueError("a PaliGemma model embeds text after an image: pass images")
    rows = [[self.tokenizer.bos_id] + list(self.tokenizer.encode(str(t))) for t in texts]
    if images is not None:
      images = fit_images(np.asarray(images, np.uint8), self.size)
    out = []
    for start, stop, idx in self._batches(len(rows)):
      length = max(16, -(-max(len(rows[i]) for i in idx) // 16) * 16)
      tokens = np.zeros((len(idx), length), np.int32)
      mask = np.zeros((len(idx), length), bool)
      for j, i in enumerate(idx):
        tokens[j, :len(rows[i])], mask[j, :len(rows[i])] = rows[i], True
      img = (images[idx] if images is not None
             else np.zeros((len(idx), self.size, self.size, 3), np.uint8))
      x, t, mk = self._put(img, tokens, mask)
      if self.family == "gemma3":
        x = None
      out.append(sharding.to_host(self._text_fn(self.params, x, t, mk))[:stop - start])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def probes(self, records: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """(image features, text states) of store records (`probe_text`)."""
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    return self.images(images), self.texts([probe_text(r) for r in records], images)


def combine(blocks: Sequence[np.ndarray], weights: Sequence[float], dims: int,
            pca_rows: int = 20_000, seed: int = 0) -> np.ndarray:
  """float32 [N, sum of dims]: each block [N, D_b] centred, projected on its
  first `dims` principal components (fitted on <= pca_rows rows), scaled to
  unit total variance and multiplied by its weight; a block of weight 0 is
  left out."""
  rng = np.random.default_rng(seed)
  out = []
  for x, w in zip(blocks, weights, strict=True):
    if w <= 0:
      continue
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    fit = x if len(x) <= pca_rows else x[rng.choice(len(x), pca_rows, replace=False)]
    cov = (fit - mean).T @ (fit - mean) / max(len(fit) - 1, 1)
    vals, vecs = np.linalg.eigh(cov)
    k = min(dims, x.shape[1])
    z = (x - mean) @ vecs[:, ::-1][:, :k]
    scale = np.sqrt((z ** 2).sum(1).mean())
    out.append(w * z / (scale if scale > 0 else 1.0))
  if not out:
    raise ValueError("every feature block has weight 0")
  return np.concatenate(out, 1).astype(np.float32)
