"""Failure types without skill labels: embed, cluster, name, validate.

Real data carries no skill label, so the labelled path (`failure_types.group`:
by skill and consensus answer) has nothing to group by. This path finds the
types in the probes themselves:

1. Embedding (`Embedder`, `combine`). Each consensus-backed probe becomes two
   vectors from one model (the auditor by default; its weights, jitted): the
   mean of the SigLIP tower's output tokens on the image the models saw, and
   the mean of the LLM's final hidden states over the probe's text, "question
   + consensus answer + edit text" (`probe_text`; the edit or caption is the
   auditor's first text when its route had one). Gemma 3 reads the text
   alone; PaliGemma, a prefix LM that needs an image, reads it after the
   image and only the text positions are pooled. Each block is centred,
   reduced to `dims` principal components, scaled to unit total variance and
   weighted (`image_weight`, `text_weight`), and the blocks are concatenated.
2. Clustering (`cluster`, `assign`). scikit-learn's HDBSCAN clusters the
   failure exemplars (probes at least one target fails); the exemplars it
   calls noise belong to no type. Every other probe joins the cluster of its
   nearest centroid if it lies within that cluster's radius (`radius_scale`
   times the largest of the members' distances to their centroid), so a type
   has failure *rates* as the labelled types have, and is counted, scored and
   ranked by `failure_types` exactly as they are.
3. Naming (`name_type`). For each of the `name_top` best-ranked types, the
   `name_show` members nearest its centroid are shown to a *namer*, which
   writes candidate names, each with the probe that tests it: a question and
   the answers that mean "this is one of them" (`Candidate`).
   - `question_namer` (any auditor): the auditor's own question route on the
     shown members' images; a question it writes becomes a candidate whose
     answers are those the references give to it on the shown members
     (most common first, until they cover half of them). The name reads
     `"QUESTION" -> ANSWERS`. In the scene world this is all the tiny
     auditor can write: scene-language questions, not names.
   - `chat_namer` (an instruction-tuned auditor, e.g. Gemma 3 IT): shown one
     member image and the shown probes as text, it writes a short name; the
     probe asks "is this question about NAME?" of each record's own
     question, answer "yes".
4. Validation (`validate`). The references (their consensus, `ask`) answer
   the candidate's probe on held-out members (members not shown to the
   namer, up to `name_members`) and on non-members (probes of other types or
   of none, up to `name_nonmembers`). A candidate is kept only if it
   separates them: member hit rate - non-member hit rate >= `name_margin`
   *and* the two 95% Wilson intervals do not overlap. The kept candidate
   with the largest separation names the type. When none is kept, the type
   keeps a *descriptive* name built from its members, not by a model
   (`descriptive_name`: the question words most over-represented among its
   members and its most common consensus answers), marked
   `named_by: "descriptive"`. Every candidate and its rates are reported.

Where records carry a skill (the scene world), `label_check` measures the
clusters against the labelled path: adjusted Rand index of the clusters
against the skill:answer categories and against the labelled failure types
(noise exemplars count as singletons; also reported over the clustered ones
alone), and `analyse_unlabelled` reports the planted gaps' recall of the
unlabelled types next to the labelled one's. Nothing here reads the ground
truth except those measurements.

Of the model layer this module imports only its input helpers
(`models.inputs.fit_images`): the caller passes the model module (`Embedder.from_sampler(sampler, models.build)`) and the mining
round's `rollout.Auditing` (namers, `references_ask`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import re
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax import sharding
from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.mine import analysis
from auditdm_jax.mine import failure_types as ft
from auditdm_jax.models.inputs import fit_images
from auditdm_jax.scenes import parse
from auditdm_jax.utils.answers import answer_key

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


# -- embedding ------------------------------------------------------------------------

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
                         return_hidden=True)[:, -tokens.shape[1]:]
      else:
        h = module.apply({"params": p}, None, tokens, mask, return_hidden=True)
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


# -- clustering -----------------------------------------------------------------------

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


# -- naming ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Candidate:
  name: str                    # what the report shows
  question: str                # the probe; "{question}" stands for each record's own
  answers: tuple[str, ...]     # normalised answers that mean "a member"
  source: str                  # who wrote it: "auditor:question", "auditor:chat", ...

  def probe(self, record: Mapping) -> str:
    return self.question.replace("{question}", str(record["question"]))


@dataclasses.dataclass
class Validation:
  member_rate: float
  nonmember_rate: float
  members: int
  nonmembers: int
  kept: bool

  @property
  def separation(self) -> float:
    return self.member_rate - self.nonmember_rate


Namer = Callable[[Sequence[Mapping]], list[Candidate]]


def validate(cand: Candidate, ask: Ask, members: Sequence[Mapping],
             nonmembers: Sequence[Mapping], margin: float = 0.3) -> Validation:
  """The references' consensus on the candidate's probe, members vs non-members:
  kept when the hit rates differ by >= margin and their 95% Wilson intervals
  do not overlap."""
  rows = list(members) + list(nonmembers)
  if not members or not nonmembers:
    return Validation(float("nan"), float("nan"), len(members), len(nonmembers), False)
  said = ask(np.stack([np.asarray(r["image"], np.uint8) for r in rows]),
             [cand.probe(r) for r in rows])
  ok = {answer_key(a) for a in cand.answers}
  hits = [bool(s) and answer_key(s) in ok for s in said]
  k_m, n_m = sum(hits[:len(members)]), len(members)
  k_o, n_o = sum(hits[len(members):]), len(nonmembers)
  rm, ro = k_m / n_m, k_o / n_o
  kept = rm - ro >= margin and ft.wilson_lower(k_m, n_m) > ft.wilson_upper(k_o, n_o)
  return Validation(rm, ro, n_m, n_o, bool(kept))


_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
  return [w for w in _WORD.findall(str(text).lower()) if w not in ("the", "a", "an")]


def descriptive_name(members: Sequence[Mapping], everyone: Sequence[Mapping],
                     n_words: int = 4, n_answers: int = 3) -> str:
  """Not a model's name: the question words most over-represented among the
  members (share of member questions holding the word minus its share over
  `everyone`; in >= 30% of members), in the order of the members' most common
  question, and the most common consensus answers with their shares:
  'how many objects -> 5 (40%) / 6 (35%) / 4 (25%)'."""
  if not members:
    return "(empty)"
  def share(rows, w):
    return sum(w in set(_words(r["question"])) for r in rows) / max(len(rows), 1)
  vocab = {w for r in members for w in _words(r["question"])}
  lift = {w: share(members, w) - share(everyone, w) for w in vocab if share(members, w) >= 0.3}
  top = sorted(lift, key=lambda w: (-lift[w], -share(members, w), w))[:n_words]
  common = collections.Counter(" ".join(_words(r["question"])) for r in members).most_common(1)
  order = {w: i for i, w in enumerate(common[0][0].split())} if common else {}
  top = sorted(top, key=lambda w: (order.get(w, len(order)), w))
  answers = collections.Counter(answer_key(r["pseudo_label"]) for r in members)
  ans = " / ".join(f"{a or '?'} ({100 * c / len(members):.0f}%)"
                   for a, c in answers.most_common(n_answers))
  return f"{' '.join(top) or '(no common words)'} -> {ans}"


def _clean_name(text: str, max_words: int = 8) -> str:
  line = next((l for l in str(text).splitlines() if l.strip()), "")
  line = line.strip().strip("\"'`*.:;- ").strip()
  return " ".join(line.split()[:max_words])[:80]


def _pad_rows(n: int, multiple: int = 16) -> list[int]:
  return list(range(n)) + [0] * (-n % multiple)


def references_ask(auditing: rollout_lib.Auditing) -> Ask:
  """The references of a mining round answer (greedily, as in mining) and
  their consensus (the round's rule; "" where none) is returned. Rows are
  padded to multiples of 16 so few batch shapes compile."""
  refs = list(auditing.references)
  sub = copy.copy(auditing)
  sub.answerers = {r: auditing.answerers[r] for r in refs}

  def ask(images, questions):
    if not len(questions):
      return []
    idx = _pad_rows(len(questions))
    images = np.asarray(images)[idx]
    answers = sub.answer(images, [questions[i] for i in idx])
    cons, _ = rollout_lib.consensus_text([answers[r][:len(questions)] for r in refs],
                                         auditing.rcfg.consensus)
    return cons
  return ask


def _context(record: Mapping):
  return record.get("context") or None


def question_namer(auditing: rollout_lib.Auditing, ask: Ask, samples: int = 2,
                   candidates: int = 4, seed: int = 0) -> Namer:
  """The auditor's question route on the shown members' images (`samples`
  each, the round's temperature); its well-formed questions, most frequent
  first, become candidates whose answers are the references' answers to
  them on the shown members, most common first until half are covered."""
  calls = [0]

  def namer(shown):
    seeds = [rollout_lib.Seed(np.asarray(r["image"], np.uint8), _context(r), r["question"])
             for r in shown]
    calls[0] += 1
    roll = auditing.run(seeds, ["question"] * len(seeds),
                        jax.random.fold_in(jax.random.key(seed), calls[0]), num_samples=samples)
    written = collections.Counter(answer_key(q) for q, ok in zip(roll.question, roll.valid)
                                  if ok and q.strip())
    text_of = {answer_key(q): q.strip() for q in roll.question}
    out = []
    images = np.stack([s.image for s in seeds])
    for norm, _ in written.most_common(candidates):
      q = text_of[norm]
      said = [answer_key(a) for a in ask(images, [q] * len(seeds)) if a]
      if not said:
        continue
      counts, chosen, covered = collections.Counter(said), [], 0
      for a, c in counts.most_common():
        chosen.append(a)
        covered += c
        if 2 * covered >= len(seeds):
          break
      out.append(Candidate(f'"{q}" -> {" / ".join(chosen)}', q, tuple(chosen),
                           "auditor:question"))
    return out
  return namer


CHAT_PROMPT = (
    "A vision-language model answered these questions about images wrongly "
    "(the correct answer follows each):\n{probes}\n"
    "What do these questions have in common? Reply with a short name of at most "
    "six words, nothing else.")
CHAT_PROBE = ('Here is a question about this image: "{question}". Is it a question '
              "about {name}? Answer yes or no.")


def chat_namer(auditing: rollout_lib.Auditing, samples: int = 2, max_new_tokens: int = 16,
               temperature: float = 0.7, seed: int = 0) -> Namer:
  """An instruction-tuned auditor (Gemma 3 IT) is shown the first member's
  image and the shown members' question, consensus answer and edit text
  (`CHAT_PROMPT`) and writes `samples` short names; each becomes the probe
  `CHAT_PROBE` about each record's own question, answer "yes"."""
  tok = auditing.tok
  stops = set(auditing.stops)
  calls = [0]

  def namer(shown):
    lines = []
    for r in shown:
      edit = (f"; edit: {r['auditor_text']}" if r.get("route") in ("edit", "caption")
              and r.get("auditor_text") else "")
      lines.append(f"- {r['question']} (correct: {r['pseudo_label']}{edit})")
    prompt = tok.prompt(CHAT_PROMPT.replace("{probes}", "\n".join(lines)))
    params = dataclasses.replace(auditing.sp1, num_samples=samples, temperature=temperature,
                                 max_new_tokens=max_new_tokens)
    calls[0] += 1
    out = auditing.auditor.sample(np.asarray(shown[0]["image"], np.uint8)[None], [prompt],
                                  params, rng=jax.random.fold_in(jax.random.key(seed), calls[0]))
    names = []
    for text in rollout_lib.decode_rows(tok, out.rows(), stops):
      name = _clean_name(text)
      if name and name.lower() not in {n.lower() for n in names}:
        names.append(name)
    return [Candidate(n, CHAT_PROBE.replace("{name}", n), ("yes",), "auditor:chat")
            for n in names]
  return namer


def default_namers(auditing: rollout_lib.Auditing, s: Mapping) -> list[Namer]:
  """The namers `s["namers"]` names, over the round's auditor and references."""
  ask = references_ask(auditing)
  made = {"question": lambda: question_namer(auditing, ask, int(s["name_samples"]),
                                             int(s["name_candidates"]), int(s["seed"])),
          "chat": lambda: chat_namer(auditing, int(s["name_samples"]), int(s["name_tokens"]),
                                     seed=int(s["seed"]))}
  return [made[n]() for n in s["namers"]]


def name_type(shown: Sequence[Mapping], held_out: Sequence[Mapping],
              nonmembers: Sequence[Mapping], everyone: Sequence[Mapping],
              namers: Sequence[Namer], ask: Ask | None, margin: float) -> dict:
  """{"name", "named_by", "descriptive", "candidates": [...]} of one type:
  the best kept candidate, else the descriptive name."""
  members = list(shown) + list(held_out)
  desc = descriptive_name(members, everyone)
  tried, best = [], None
  if ask is not None:
    for namer in namers:
      for cand in namer(shown):
        v = validate(cand, ask, held_out, nonmembers, margin)
        tried.append({"name": cand.name, "source": cand.source, "probe": cand.question,
                      "answers": list(cand.answers), "member_rate": v.member_rate,
                      "nonmember_rate": v.nonmember_rate, "members": v.members,
                      "nonmembers": v.nonmembers, "kept": v.kept})
        if v.kept and (best is None or v.separation > best[1].separation):
          best = (cand, v)
  if best is None:
    return {"name": desc, "named_by": DESCRIPTIVE, "descriptive": desc, "candidates": tried}
  return {"name": best[0].name, "named_by": best[0].source, "descriptive": desc,
          "candidates": tried}


# -- the unlabelled failure types -----------------------------------------------------

def probes_of(records: Sequence[Mapping]) -> list[ft.Probe]:
  """The records as `failure_types.Probe`s (as `analysis.analyse` makes them)."""
  return [ft.Probe(r["id"], r.get("skill", ""), answer_key(r["pseudo_label"]),
                   r.get("factor", ""), tuple(r["failed"]),
                   tuple(sorted(parse.subject_attributes(r["question"]).items())))
          for r in records]


def _ordered(x: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
  """The indices of cluster c, nearest its centroid first."""
  idx = np.nonzero(labels == c)[0]
  return idx[np.argsort(np.linalg.norm(x[idx] - x[idx].mean(0), axis=1), kind="stable")]


def unlabelled_types(records: Sequence[Mapping], x: np.ndarray, targets: Sequence[str],
                     focus: str, s: Mapping) -> tuple[list[ft.FailureType], np.ndarray]:
  """(failure types ranked for `focus`, int [N] type of each record, -1 none).
  `x` [N, D]: the records' combined features. The types are HDBSCAN clusters
  of the failure exemplars, joined by the other probes within their radius;
  each type's `ids` (the focus target's failures) run nearest-centroid first."""
  if focus not in targets:
    raise ValueError(f"focus target {focus!r} is not among the targets {list(targets)}")
  x = np.asarray(x, np.float32)
  if len(x) != len(records):
    raise ValueError(f"{len(records)} records but {len(x)} feature rows")
  failed = np.array([bool(r["failed"]) for r in records], bool)
  labels = np.full(len(records), -1, int)
  ex = np.nonzero(failed)[0]
  labels[ex] = cluster(x[ex], int(s["min_cluster_size"]), int(s["min_samples"]))
  cents, radii = centroids(x[ex], labels[ex], float(s["radius_scale"]))
  rest = np.nonzero(~failed)[0]
  labels[rest] = assign(x[rest], cents, radii)
  probes = probes_of(records)
  types = []
  for c in range(len(cents)):
    idx = _ordered(x, labels, c)
    ty = ft.make_type(f"cluster {c}", [probes[i] for i in idx], targets, focus)
    ty.cluster = c
    types.append(ty)
  ft.score_types(types, probes, targets)
  types = [t for t in types if sum(t.failures.values())]
  return ft.rank_types(types, focus), labels


def label_check(records: Sequence[Mapping], labels: np.ndarray,
                labelled_types: Sequence[Mapping] = ()) -> dict:
  """How well the clusters recover the labelled path's types, on the failure
  exemplars: adjusted Rand index against the skill:answer categories
  (`ari_skill_answer`) and against the labelled answer types, whose numeric
  ranges merge answers (`ari_labelled_types`; attribute types left out), each
  with noise exemplars as singletons and over the clustered exemplars alone
  (`..._clustered`)."""
  from sklearn.metrics import adjusted_rand_score  # pylint: disable=import-outside-toplevel
  idx = [i for i, r in enumerate(records) if r["failed"]]
  if not idx:
    return {"exemplars": 0}
  pred = np.asarray(labels)[idx]
  single = np.where(pred >= 0, pred, -1 - np.arange(len(pred)))   # noise: singletons
  cat = [f"{records[i].get('skill') or ft.UNKNOWN_SKILL}: "
         f"{answer_key(records[i]['pseudo_label'])}" for i in idx]
  type_of = {}
  for t in labelled_types:
    if t.get("attribute"):
      continue
    for lab in t.get("labels", ()):
      type_of[(t["skill"], lab)] = t["name"]
  typ = [type_of.get((records[i].get("skill") or ft.UNKNOWN_SKILL,
                      answer_key(records[i]["pseudo_label"])), c)
         for i, c in zip(idx, cat)]
  on = pred >= 0
  nan = float("nan")
  def ari(truth, mask=None):
    truth = np.asarray(truth)
    if mask is None:
      return float(adjusted_rand_score(truth, single))
    return float(adjusted_rand_score(truth[mask], pred[mask])) if mask.sum() > 1 else nan
  return {"exemplars": len(idx), "clusters": int(pred.max()) + 1 if on.any() else 0,
          "noise_fraction": float(1 - on.mean()), "categories": len(set(cat)),
          "labelled_types": len(set(typ)),
          "ari_skill_answer": ari(cat), "ari_skill_answer_clustered": ari(cat, on),
          "ari_labelled_types": ari(typ), "ari_labelled_types_clustered": ari(typ, on)}


def analyse_unlabelled(records: Sequence[Mapping], targets: Sequence[str], focus: str,
                       gaps: Mapping[str, Sequence[str]], m: Mapping, x: np.ndarray, *,
                       namers: Sequence[Namer] = (), ask: Ask | None = None,
                       labelled: Mapping | None = None) -> dict:
  """The unlabelled failure types of the mined `records` and, where records
  carry skills, how they compare with the labelled path (`labelled`: the
  result of `analysis.analyse`). `m`: the mine settings (top_k, purity) with
  the unlabelled ones under "unlabelled" (`settings`); `x` [N, D]: the
  records' combined features (`combine` of `Embedder.probes`). Returns
  {"failure_types": [{..., "cluster", "size", "named_by", "descriptive",
  "candidates"}], "planted_gaps", "planted_gap_recall", "check", "settings"}."""
  s = settings(m.get("unlabelled"))
  x = np.asarray(x, np.float32)
  types, labels = unlabelled_types(records, x, targets, focus, s)
  by_id = {r["id"]: r for r in records}
  rng = np.random.default_rng(int(s["seed"]))
  named = []
  for rank, t in enumerate(types):
    c = t.cluster
    members = [records[i] for i in _ordered(x, labels, c) if records[i]["failed"]]
    shown = members[:int(s["name_show"])]
    rest = members[int(s["name_show"]):]
    held = [rest[i] for i in sorted(rng.permutation(len(rest))[:int(s["name_members"])])]
    others = np.nonzero(labels != c)[0]
    non = [records[i] for i in sorted(rng.permutation(others)[:int(s["name_nonmembers"])])]
    if rank < int(s["name_top"]):
      info = name_type(shown, held, non, records, namers, ask, float(s["name_margin"]))
    else:
      desc = descriptive_name(members, records)
      info = {"name": desc, "named_by": DESCRIPTIVE, "descriptive": desc, "candidates": []}
    t.name = info["name"]
    named.append({**t.to_json(focus), "cluster": int(c), "size": len(members),
                  "members": [r["id"] for r in members[:8]], **info})
  truth = analysis.scene_truth(by_id)
  planted, found, total = {}, 0, 0
  for tg in targets:
    res = ft.gap_recall(types, tg, list(gaps.get(tg, ())), truth, int(m["top_k"]),
                        float(m["purity"]))
    planted[tg] = res
    found += sum(v["found"] for v in res.values())
    total += len(res)
  focus_gaps = planted.get(focus, {})
  nan = float("nan")
  out = {"failure_types": named, "planted_gaps": planted,
         "planted_gap_recall": (sum(v["found"] for v in focus_gaps.values()) / len(focus_gaps)
                                if focus_gaps else nan),
         "planted_gap_recall_all_targets": found / total if total else nan,
         "clusters": int(labels.max()) + 1 if (labels >= 0).any() else 0,
         "probes_in_types": int((labels >= 0).sum()),
         "named": sum(t["named_by"] != DESCRIPTIVE for t in named),
         "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}}
  if any(r.get("skill") for r in records):
    check = label_check(records, labels, (labelled or {}).get("failure_types", ()))
    if labelled is not None:
      check["planted_gap_recall_labelled"] = labelled.get("planted_gap_recall")
      check["planted_gap_recall_unlabelled"] = out["planted_gap_recall"]
      check["planted_gaps_labelled"] = labelled.get("planted_gaps")
    out["check"] = check
  return out


def mine_unlabelled(records: Sequence[Mapping], targets: Sequence[str], focus: str,
                    gaps: Mapping[str, Sequence[str]], m: Mapping,
                    auditing: rollout_lib.Auditing, build, *,
                    labelled: Mapping | None = None, log=print) -> dict:
  """The whole unlabelled path in one call, as the mine stage runs it:
  embed `records` with the round's auditor (`Embedder.from_sampler`;
  `build` = `models.build`), `combine`, `analyse_unlabelled` with the
  configured namers and the round's references. `m`: the mine settings,
  the unlabelled ones under "unlabelled"; `labelled`: `analysis.analyse`'s
  result, for the check."""
  s = settings(m.get("unlabelled"))
  t0 = time.time()
  if not records:
    return {"failure_types": [], "clusters": 0, "settings": dict(s, namers=list(s["namers"]))}
  emb = Embedder.from_sampler(auditing.auditor, build, int(s["batch"]))
  img, txt = emb.probes(records)
  x = combine([img, txt], [float(s["image_weight"]), float(s["text_weight"])], int(s["dims"]),
              int(s["pca_rows"]), int(s["seed"]))
  t1 = time.time()
  out = analyse_unlabelled(records, targets, focus, gaps, m, x,
                           namers=default_namers(auditing, s), ask=references_ask(auditing),
                           labelled=labelled)
  out["embed_s"], out["wall_s"] = t1 - t0, time.time() - t0
  top = "; ".join(f"{t['name']} ({t['count']}, {t['named_by']})"
                  for t in out["failure_types"][:3])
  chk = out.get("check", {})
  extra = (f"; ARI vs skill:answer {chk['ari_skill_answer']:.3f}, vs labelled types "
           f"{chk['ari_labelled_types']:.3f}" if "ari_skill_answer" in chk else "")
  log(f"mine (unlabelled): {out['clusters']} clusters, {out['named']} named by a model; "
      f"top types of {focus}: {top}; planted-gap recall {out['planted_gap_recall']:.2f}"
      f"{extra}; {out['wall_s']:.0f}s")
  return out
