"""Keeping the auditor diverse: descriptor-conditioned GRPO with an archive.

Plain GRPO against one target collapses onto the one probe that pays most
(docs/audit.md: "how many objects are there?" for 94% of the finds after step
20). Shaping the reward of the successes does not help once the policy has
stopped trying anything else. `audit.diversity.mode = "descriptors"` keeps
the breadth by construction, as Rainbow Teaming conditions its attacker on a
category: every GRPO group (seed image x K samples) asks its question
through a prompt that names one *descriptor*, a kind of question such as the
paper's failure types ("counting", "position", ...; `text.question_prompt`).
The K samples of a group compete only with each other, so the policy learns
the best probe of every descriptor instead of the best probe overall, and
mining spreads each seed image's samples over the descriptors. A probe off
its descriptor is paid as invalid (`Adherence`: the frozen warm start's
likelihood of the question under each descriptor's prompt judges), or the
policy writes the one paying question under every descriptor.

The state is an archive in the spirit of MAP-Elites: per descriptor, how
often it was asked (`tries`), how often a probe succeeded (`successes`),
and its elite probes (the most successful distinct questions, with their
counts); the same counts per cell, pairing x descriptor (a question, an
edit and a question, an edit alone: Rainbow Teaming's category x style). It is a fold over the per-step journal `audit/diversity.jsonl`, so
a resumed run rebuilds exactly the state of its checkpoint's step. It
reads only the auditor's texts and the reward's decisions: nothing of the
scene world's truth. The trained auditor spends a search budget by it
(`search = "archive"`: cells in proportion to their paid rate), so it
searches where the target fails while mining still covers every kind.

Also here: what "diverse" is measured by (`diversity_figures`), on any
probe set: the most common question's share, distinct questions, the
entropy of question templates (the first two words and the length, a
text-only proxy that works on real questions), and the failure categories
(given per probe by the caller: the skill:answer categories of the scene
world, a measurement only).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from auditdm_jax.utils import draws
from auditdm_jax.utils.fileio import atomic_write_text

MODES = ("none", "descriptors")
ADHERENCE = ("warm_likelihood", "off")
SEARCH = ("archive", "thompson", "uniform")
DEFAULT_TEMPLATE = "ask a question about {descriptor}"


@dataclasses.dataclass(frozen=True)
class DiversityConfig:
  """`audit.diversity`.

  mode         "none": plain GRPO (one generic question prompt);
               "descriptors": every group's question prompt names a descriptor.
  descriptors  the kinds of question, as words the auditor reads.
  prompt       the question prompt, with `{descriptor}`.
  generic      share of the groups asked with the generic prompt instead
               (0: none), so the auditor still probes what no descriptor names.
  elites       elite probes kept per descriptor in the archive.
  adherence    "warm_likelihood": a probe pays only when its question reads as
               its descriptor's (`Adherence`: the warm-start auditor's
               likelihood of the question is highest under that descriptor's
               prompt); "off": any probe pays.
  search       how the trained auditor spends a search budget: "archive",
               cells (pairing x descriptor, `archive_weights`) drawn in
               proportion to their paid rate in the archive (probability
               matching on (successes + 1) / (tries + 2): the auditor has
               learned where the target fails and which kind of probe finds
               it); "thompson", each cell in proportion to the posterior
               probability that it pays best (Thompson's probability matching
               on the cells' Beta(successes + 1, failures + 1) posteriors:
               with many tries it concentrates on the best cell); "uniform",
               the mixture's pairings and the descriptors evenly. Mining
               always spreads evenly (coverage).
  """

  mode: str = "none"
  descriptors: tuple[str, ...] = ()
  prompt: str = DEFAULT_TEMPLATE
  generic: float = 0.0
  elites: int = 8
  adherence: str = "warm_likelihood"
  search: str = "archive"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"audit.diversity.mode must be one of {MODES}, got {self.mode!r}")
    if isinstance(self.descriptors, str) or not all(
        isinstance(d, str) and d.strip() for d in self.descriptors):
      raise ValueError(f"audit.diversity.descriptors must be a list of non-empty strings, "
                       f"got {self.descriptors!r}")
    if len(set(self.descriptors)) != len(self.descriptors):
      raise ValueError(f"audit.diversity.descriptors repeats a descriptor: "
                       f"{list(self.descriptors)}")
    if self.mode == "descriptors" and not self.descriptors:
      raise ValueError("audit.diversity.mode 'descriptors' needs a non-empty "
                       "audit.diversity.descriptors")
    if "{descriptor}" not in self.prompt:
      raise ValueError(f"audit.diversity.prompt must contain '{{descriptor}}', got "
                       f"{self.prompt!r}")
    if not (isinstance(self.generic, (int, float)) and 0.0 <= self.generic < 1.0):
      raise ValueError(f"audit.diversity.generic must be in [0, 1), got {self.generic!r}")
    if self.adherence not in ADHERENCE:
      raise ValueError(f"audit.diversity.adherence must be one of {ADHERENCE}, got "
                       f"{self.adherence!r}")
    if self.search not in SEARCH:
      raise ValueError(f"audit.diversity.search must be one of {SEARCH}, got {self.search!r}")
    if not isinstance(self.elites, int) or self.elites < 1:
      raise ValueError(f"audit.diversity.elites must be an int >= 1, got {self.elites!r}")

  @property
  def on(self) -> bool:
    return self.mode == "descriptors"

  @classmethod
  def from_config(cls, section) -> "DiversityConfig":
    d = dict(section or {})
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"audit.diversity has unknown keys {unknown}; known: "
                       f"{[f.name for f in dataclasses.fields(cls)]}")
    if "descriptors" in d:
      d["descriptors"] = tuple(d["descriptors"])
    return cls(**d)

  def prompt_text(self, descriptor: str, generic_prompt: str) -> str:
    return generic_prompt if not descriptor else self.prompt.format(descriptor=descriptor)

  def slots(self) -> list[str]:
    """The descriptors one cycle of `assign` walks through."""
    return list(self.descriptors)


def assign(cfg: DiversityConfig, n: int, offset: int, rng: np.random.Generator) -> list[str]:
  """Descriptors for n groups ("" = the generic prompt): a stratified walk
  through the descriptors starting at `offset` (every descriptor gets n / D
  groups, +-1, over any window), each group generic with probability
  `cfg.generic`; the order is shuffled. Plain GRPO: all generic."""
  if not cfg.on:
    return [""] * n
  d = cfg.slots()
  out = [d[(offset + j) % len(d)] for j in range(n)]
  if cfg.generic:
    out = ["" if rng.random() < cfg.generic else x for x in out]
  return [out[i] for i in rng.permutation(n)]


CELL_SEP = "|"


def cell_key(pairing: str, descriptor: str) -> str:
  """An archive cell, `pairing|descriptor` ("" = the generic prompt, or no
  question: an edit alone), as journaled and in audit.json."""
  return f"{pairing}{CELL_SEP}{descriptor}"


def split_cell(key: str) -> tuple[str, str]:
  pairing, sep, descriptor = key.partition(CELL_SEP)
  if not sep or not pairing:
    raise ValueError(f"not an archive cell (pairing{CELL_SEP}descriptor): {key!r}")
  return pairing, descriptor


def archive_weights(cfg: DiversityConfig, archive: "Archive",
                    mixture: Mapping[str, float], asks_question: Mapping[str, bool]
                    ) -> dict[str, float]:
  """The weights of `search = "archive"`: every cell the audit mixture can
  draw (each pairing with a question x each descriptor, + the generic prompt
  when `cfg.generic`; a pairing without a question, one cell), weighted by
  its posterior mean paid rate in the archive, (successes + 1) / (tries + 2).
  The search so also learns which kind of probe pays (a question, an edit and
  a question, an edit alone), as Rainbow Teaming's archive keys attacks by
  category x style."""
  descs = list(cfg.descriptors) + ([""] if cfg.generic else [])
  out = {}
  for p, w in mixture.items():
    if w <= 0:
      continue
    for d in (descs if asks_question[p] else [""]):
      k = cell_key(p, d)
      out[k] = (archive.cell_successes[k] + 1) / (archive.cell_tries[k] + 2)
  if cfg.search == "thompson":
    return best_cell_probability(
        {k: (archive.cell_successes[k], archive.cell_tries[k]) for k in out})
  return out


def best_cell_probability(counts: Mapping[str, tuple[int, int]], draws_n: int = 4096,
                          seed: int = 0) -> dict[str, float]:
  """{cell: P(its paid rate is the highest)} under independent
  Beta(successes + 1, tries - successes + 1) posteriors, estimated from
  `draws_n` joint draws with a fixed seed (the same archive, the same
  weights)."""
  keys = sorted(counts)
  if not keys:
    raise ValueError("no cells to weigh")
  s = np.array([counts[k][0] for k in keys], np.float64)
  t = np.array([counts[k][1] for k in keys], np.float64)
  if np.any(s < 0) or np.any(t < s):
    raise ValueError(f"cell counts must satisfy 0 <= successes <= tries, got {dict(counts)}")
  rng = np.random.default_rng(seed)
  theta = rng.beta(s + 1, t - s + 1, size=(draws_n, len(keys)))
  wins = np.bincount(theta.argmax(axis=1), minlength=len(keys)) / draws_n
  return {k: float(w) for k, w in zip(keys, wins)}


def draw_weighted(weights: Mapping[str, float], n: int, rng: np.random.Generator) -> list[str]:
  """n descriptors in proportion to `weights`, drawn systematically (each
  count is floor or ceil of n x p) and shuffled."""
  w = {k: float(v) for k, v in weights.items()}
  if not w or not all(np.isfinite(v) and v >= 0 for v in w.values()) or sum(w.values()) <= 0:
    raise ValueError(f"descriptor weights must be finite, >= 0 and not all 0, got "
                     f"{dict(weights)}")
  return draws.systematic_draw(w, n, rng)


def spread(cfg: DiversityConfig, n_seeds: int, samples: int, offset: int = 0
           ) -> tuple[list[int], list[str], int]:
  """Mining: each seed's `samples` probes spread over the descriptors.
  Returns (the seed position of each group, each group's descriptor, the
  samples per group): with D descriptors a seed gets m = min(samples, D)
  groups of samples / m (samples must divide), the descriptors walked in
  order from `offset` + the seed's position, so every descriptor meets every
  kind of image. Plain GRPO: one generic group of `samples` per seed."""
  if not cfg.on:
    return list(range(n_seeds)), [""] * n_seeds, samples
  d = cfg.slots() + ([""] if cfg.generic else [])
  m = min(samples, len(d))
  if samples % m:
    raise ValueError(f"mine.samples_per_seed ({samples}) must be a multiple of the "
                     f"{m} descriptor groups each seed gets (audit.diversity.descriptors"
                     f"{' + the generic prompt' if cfg.generic else ''})")
  groups, descs = [], []
  for s in range(n_seeds):
    for t in range(m):
      groups.append(s)
      descs.append(d[(offset + s * m + t) % len(d)])
  return groups, descs, samples // m


class Adherence:
  """Does each probe's question read as the descriptor it was asked for?

  Conditioning alone does not keep a policy on its descriptor: GRPO pays a
  "colour" group's sample that asks "how many objects are there?" whenever
  that pays more (measured: 81% of the trained auditor's probes, every
  descriptor, were that question). The judge is the warm-start auditor, frozen:
  it scores the question's tokens under every descriptor's prompt, the
  question reads as the descriptors of highest likelihood (a zero-shot
  classifier from the model's own instruction following, as any MLLM
  auditor offers), and a probe adheres when its descriptor is the argmax.
  `sampler` is a `Sampler` over the warm-start params; `batch` rows a call."""

  def __init__(self, sampler, cfg: DiversityConfig, generic_prompt: str, batch: int = 256):
    self.sampler, self.cfg, self.batch = sampler, cfg, int(batch)
    tok = sampler.tokenizer
    self.descs = cfg.slots()
    self.prompts = [tok.prompt(cfg.prompt_text(d, generic_prompt)) for d in self.descs]

  def loglik(self, images, completions) -> np.ndarray:
    """float32 [N, D]: log p_warm(completion_i | image_i, prompt of descriptor d)."""
    n, d = len(completions), len(self.descs)
    rows = [(i, j) for i in range(n) for j in range(d)]
    out = np.zeros((n, d), np.float32)
    for start in range(0, len(rows), self.batch):
      part = rows[start:start + self.batch]
      pad = part + [part[0]] * (self.batch - len(part))    # one shape: one compile
      lp = self.sampler.score(np.stack([images[i] for i, _ in pad]),
                              [self.prompts[j] for _, j in pad],
                              [list(completions[i]) or [0] for i, _ in pad])
      for (i, j), v in zip(part, lp):
        out[i, j] = float(np.sum(v))
    return out

  def __call__(self, roll) -> np.ndarray:
    """bool [N]: True where the row adheres (or has no descriptor, or is invalid:
    its reward is already the invalid one)."""
    ok = np.ones(roll.n, bool)
    idx = [i for i in range(roll.n) if roll.descriptor[i] and roll.valid[i]]
    if not idx:
      return ok
    ll = self.loglik([roll.images_in[i][-1] for i in idx], [roll.tokens[i][-1] for i in idx])
    best = ll.argmax(axis=1)
    for row, i in enumerate(idx):
      ok[i] = self.descs[best[row]] == roll.descriptor[i]
    return ok


def apply_adherence(reward, success, ok, invalid_reward: float
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(reward, success) with the rows that do not adhere paid as invalid
  (`RewardConfig.invalid_reward`: a question of another kind is not what
  was asked for; paid 0 instead, a group whose descriptor the target never
  fails drifts to the always-valid off-descriptor question) and not counted
  as successes."""
  ok = np.asarray(ok, bool)
  return (np.where(ok, reward, np.minimum(reward, invalid_reward)).astype(np.float32),
          np.asarray(success, bool) & ok)


class Archive:
  """Per descriptor ("" = generic, or no question): tries, successes and the
  elite probes (question -> successes, the `elites` most successful kept);
  per cell (`cell_key`: pairing x descriptor), tries and successes."""

  def __init__(self, cfg: DiversityConfig):
    self.cfg = cfg
    self.tries: collections.Counter = collections.Counter()
    self.successes: collections.Counter = collections.Counter()
    self.cell_tries: collections.Counter = collections.Counter()
    self.cell_successes: collections.Counter = collections.Counter()
    self.elites: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

  def update(self, descriptors: Sequence[str], questions: Sequence[str], success,
             pairings: Sequence[str]) -> None:
    for d, q, ok, p in zip(descriptors, questions, np.asarray(success, bool), pairings,
                           strict=True):
      self.tries[d] += 1
      self.cell_tries[cell_key(p, d)] += 1
      if ok:
        self.successes[d] += 1
        self.cell_successes[cell_key(p, d)] += 1
        self.elites[d][q] += 1
    for d, c in self.elites.items():
      if len(c) > self.cfg.elites:
        self.elites[d] = collections.Counter(dict(sorted(
            c.items(), key=lambda kv: (-kv[1], kv[0]))[:self.cfg.elites]))

  def state(self) -> dict:
    keys = sorted(set(self.tries) | set(self.successes))
    return {"tries": {k: int(self.tries[k]) for k in keys},
            "successes": {k: int(self.successes[k]) for k in keys},
            "success_rate": {k: (self.successes[k] / self.tries[k] if self.tries[k] else 0.0)
                             for k in keys},
            "elites": {k: [[q, int(n)] for q, n in sorted(
                self.elites[k].items(), key=lambda kv: (-kv[1], kv[0]))] for k in keys},
            "cells": {k: {"tries": int(self.cell_tries[k]),
                          "successes": int(self.cell_successes[k])}
                      for k in sorted(self.cell_tries)}}


class Journal:
  """`audit/diversity.jsonl`: one row per GRPO step (its descriptors,
  pairings, questions and successes); the archive is their fold, so a resumed run
  truncates the rows after its checkpoint and rebuilds the archive of that
  step (`Journal.resume`)."""

  def __init__(self, cfg: DiversityConfig, path: str):
    self.cfg, self.path = cfg, path
    self.archive = Archive(cfg)

  def resume(self, last_step: int, write: bool = True) -> None:
    """Keeps the rows of steps <= last_step (rewriting the file when
    `write`, process 0) and folds them into a fresh archive."""
    self.archive = Archive(self.cfg)
    rows = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: a corrupt line ({e}); delete the file and the "
                             f"audit checkpoints to start the audit again") from e
          if int(row["step"]) <= last_step:
            if "pairings" not in row:
              raise ValueError(f"{self.path}: step {row['step']} was journaled without its "
                               f"pairings (an older version); delete {self.path} and the "
                               f"audit checkpoints to start the audit again")
            rows.append(row)
      if write:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
    for row in rows:
      self.archive.update(row["descriptors"], row["questions"], row["success"],
                          row["pairings"])

  def record(self, step: int, descriptors, questions, success, pairings,
             write: bool = True) -> None:
    row = {"step": int(step), "descriptors": list(descriptors), "pairings": list(pairings),
           "questions": list(questions),
           "success": [bool(x) for x in np.asarray(success, bool)]}
    self.archive.update(row["descriptors"], row["questions"], row["success"],
                        row["pairings"])
    if write:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")


# -- measuring diversity -------------------------------------------------------

def question_template(question: str) -> str:
  """A text-only template of a question: its first two words and its length
  in words ("how many/5"); questions of one form share it whatever objects
  they name."""
  words = question.lower().replace("?", " ").split()
  return f"{' '.join(words[:2])}/{len(words)}"


def entropy_bits(items: Iterable) -> float:
  counts = np.array(list(collections.Counter(items).values()), float)
  if not counts.size:
    return 0.0
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


def diversity_figures(questions: Sequence[str], failed: Sequence[bool] | None = None,
                      categories: Sequence[str] | None = None, min_count: int = 3
                      ) -> dict:
  """How diverse a set of probes is:

    probes               how many
    top_question         the most common question, `top_question_share` its share
    distinct_questions   how many different questions
    template_entropy     entropy (bits) of `question_template` over the probes
    failure_categories   with `failed` and `categories` (per probe): how many
                         categories hold >= `min_count` failures
  """
  qs = [q.strip().lower() for q in questions]
  out: dict = {"probes": len(qs)}
  if qs:
    top, n = collections.Counter(qs).most_common(1)[0]
    out.update(top_question=top, top_question_share=n / len(qs))
  else:
    out.update(top_question="", top_question_share=float("nan"))
  out["distinct_questions"] = len(set(qs))
  out["template_entropy"] = entropy_bits(question_template(q) for q in qs)
  if failed is not None and categories is not None:
    c = collections.Counter(cat for cat, f in zip(categories, failed, strict=True) if f and cat)
    out["failure_categories"] = sum(1 for v in c.values() if v >= min_count)
  return out


def describe(fig: Mapping) -> str:
  """One log phrase of `diversity_figures`."""
  return (f"top question {fig['top_question']!r} {fig['top_question_share']:.3f} of "
          f"{fig['probes']}, {fig['distinct_questions']} distinct, template entropy "
          f"{fig['template_entropy']:.2f} bits, {fig.get('failure_categories', 0)} failure "
          f"categories")


def per_seed_success(success, groups: Sequence[int]) -> float:
  """The paper's search success: the share of seed images on which at least
  one probe (rows grouped by `groups`, the seed of each row) succeeds."""
  success = np.asarray(success, bool)
  by: dict[int, bool] = {}
  for g, ok in zip(groups, success, strict=True):
    by[g] = by.get(g, False) or bool(ok)
  return float(np.mean(list(by.values()))) if by else float("nan")


def check_section(section: Mapping | None) -> list[str]:
  try:
    DiversityConfig.from_config(section)
  except (ValueError, TypeError) as e:
    return [str(e)]
  return []

