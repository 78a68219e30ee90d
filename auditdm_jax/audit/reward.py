"""The disagreement reward: does the target differ from the references' consensus?

Answers arrive as text, are normalised (`utils.answers.answer_key`), encoded as
UTF-8 bytes (`byte_ids`: exact, whatever the models' tokenizers) and padded
to id arrays; from there the reward is a pure jitted function of the ids:

  ref_ids     int32 [R, B, L]   every reference's normalised answer (0 = pad)
  target_ids  int32 [B, L]      the target's normalised answer
  valid       bool  [B]         the auditor's output was well-formed and applied

  reward[b] = invalid_reward                    if not valid[b]
            = 1                                 if a consensus exists and the
                                                target's answer differs
            = 0                                 otherwise

An empty reference answer abstains: it never joins a consensus. "unanimous"
needs every reference to give the same non-empty answer; "majority" needs
one answer given by more than half of all references (abstentions count
against it, so ties never form a consensus). An empty target answer is no
answer: its own outcome, never a disagreement (a question that makes every
model babble must not pay as a find).

Answers are first extracted the way an evaluator reads them
(`extract_answer`): where the editor knows the question's answer space (the
scene world knows every question's), an answer outside it ("nononono" to a
yes/no question, "triangle" to "is there a red circle?") is unparseable and
becomes empty, so a reference abstains and the target has not answered.

Optional terms (`RewardConfig`): in `judge` mode a judge model
(`RewardConfig.judge`, default the first reference) decides whether the
target's answer and the consensus mean the same: p(same) is the probability
of "yes" against "no" under that model (`judge_same_prob`, its jitted,
sharded scorer, fixed batches of `judge_batch` rows; `ModelJudge`). Where
the exact comparison finds the answers equal, they mean the same and no
judge is asked (p_same = 1); the judge decides the rows where they differ,
and `judged_reward` (jitted, a pure function of p_same) pays those it
finds below `judge_threshold`. So the judge can only turn an exact
disagreement into an agreement, never the reverse. `soft_weight` adds a
term from -log p_target(consensus answer), bounded as
weight * (1 - p_target(consensus)): a dense signal of how far the target is
from the consensus.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax.models.inputs import fit_images
from auditdm_jax.utils.answers import answer_key, spoken_key

CONSENSUS_RULES = ("unanimous", "majority")
MODES = ("exact", "judge")

def extract_answer(text: str, space: Sequence[str] | None) -> str:
  """The normalised answer, or "" (unparseable) when `space` (the question's
  possible answers; None = any answer) does not hold it."""
  norm = answer_key(text)
  if space is None:
    return norm
  return norm if norm in {answer_key(a) for a in space} else ""


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  consensus: str = "majority"        # unanimous | majority
  invalid_reward: float = -1.0       # for malformed / rejected auditor outputs
  mode: str = "exact"                # exact | judge
  judge: str = ""                    # judge: the judging model's name ("" = the first reference)
  judge_threshold: float = 0.5       # judge: p(same meaning) below this = disagreement
  judge_batch: int = 32              # judge: rows per scoring call (fixed shape)
  soft_weight: float = 0.0           # weight of 1 - p_target(consensus answer)
  max_answer_tokens: int = 16        # ids (bytes) per answer; longer ones are fingerprinted

  def __post_init__(self):
    problems = []
    if self.consensus not in CONSENSUS_RULES:
      problems.append(f"consensus must be one of {CONSENSUS_RULES}, got {self.consensus!r}")
    if self.mode not in MODES:
      problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
    for name in ("invalid_reward", "soft_weight", "judge_threshold"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not np.isfinite(v):
        problems.append(f"{name} must be a finite number, got {v!r}")
    if not 0.0 < float(self.judge_threshold) < 1.0:
      problems.append(f"judge_threshold must be in (0, 1), got {self.judge_threshold!r}")
    if self.soft_weight < 0:
      problems.append(f"soft_weight must be >= 0, got {self.soft_weight!r}")
    if not isinstance(self.max_answer_tokens, int) or self.max_answer_tokens < 1:
      problems.append(f"max_answer_tokens must be an int >= 1, got {self.max_answer_tokens!r}")
    if not isinstance(self.judge, str):
      problems.append(f"judge must be a model name (a string), got {self.judge!r}")
    if (isinstance(self.judge_batch, bool) or not isinstance(self.judge_batch, int)
        or self.judge_batch < 1):
      problems.append(f"judge_batch must be an int >= 1, got {self.judge_batch!r}")
    if problems:
      raise ValueError("invalid RewardConfig: " + "; ".join(problems))


def byte_ids(text: str) -> list[int]:
  """The answer's UTF-8 bytes + 1 (never the pad 0): an exact, tokenizer-free
  encoding. A model's tokenizer is the wrong tool here: the scene world's has
  no digit pieces, so every normalised count ("5", "6") became the same
  unknown id and no counting disagreement could ever pay."""
  return [b + 1 for b in text.encode("utf-8")]


def encode_answers(texts: Sequence[str], encode=byte_ids, length: int = 16) -> np.ndarray:
  """int32 [len(texts), length]: each normalised answer's ids, zero-padded.

  `encode(text) -> list[int]` (default `byte_ids`) must be injective on
  answers and must not produce id 0 (the pad). An answer
  longer than `length` ids is not cut (that could make two different answers
  equal): it becomes `length` negative ids from a SHA-256 of its normalised
  text, equal exactly for equal long answers (up to hash collisions) and
  never equal to a short answer's ids. The rows are only compared.
  """
  out = np.zeros((len(texts), length), np.int32)
  for i, t in enumerate(texts):
    norm = answer_key(t)
    ids = list(encode(norm)) if norm else []
    if len(ids) > length:
      digest = hashlib.sha256(norm.encode("utf-8")).digest()
      words = np.frombuffer((digest * (1 + 4 * length // len(digest)))[:4 * length], "<u4")
      out[i] = -(1 + (words.astype(np.int64) & 0x3FFFFFFF)).astype(np.int32)
      continue
    if any(int(x) == 0 for x in ids):
      raise ValueError(f"answer {t!r} encodes to the pad id 0")
    out[i, :len(ids)] = ids
  return out


def consensus(ref_ids, rule: str):
  """(consensus ids [B, L], has_consensus bool [B]) from ref_ids [R, B, L]."""
  ref_ids = jnp.asarray(ref_ids)
  r = ref_ids.shape[0]
  nonempty = jnp.any(ref_ids != 0, axis=-1)                               # [R, B]
  same = jnp.all(ref_ids[:, None] == ref_ids[None, :], axis=-1)           # [R, R, B]
  votes = jnp.sum(same & nonempty[None, :] & nonempty[:, None], axis=1)   # [R, B]
  best = jnp.argmax(votes, axis=0)                                        # [B]
  best_votes = jnp.take_along_axis(votes, best[None], axis=0)[0]
  if rule == "unanimous":
    has = best_votes == r
  elif rule == "majority":
    has = 2 * best_votes > r
  else:
    raise ValueError(f"consensus rule must be one of {CONSENSUS_RULES}, got {rule!r}")
  cons = jnp.take_along_axis(ref_ids, best[None, :, None], axis=0)[0]     # [B, L]
  return cons, has


@functools.partial(jax.jit, static_argnames=("rule",))
def disagreement_reward(target_ids, ref_ids, valid, invalid_reward, rule: str = "majority"):
  """(reward float32 [B], has_consensus [B], disagree [B]); see the module doc."""
  cons, has = consensus(ref_ids, rule)
  target_ids = jnp.asarray(target_ids)
  answered = jnp.any(target_ids != 0, axis=-1)
  differs = jnp.any(target_ids != cons, axis=-1)
  disagree = has & answered & differs & valid
  reward = jnp.where(valid, disagree.astype(jnp.float32),
                     jnp.asarray(invalid_reward, jnp.float32))
  return reward, has & valid, disagree


@jax.jit
def judged_reward(p_same, has_consensus, valid, invalid_reward, threshold):
  """Judge mode: disagreement where p(same meaning) < threshold."""
  disagree = has_consensus & valid & (p_same < threshold)
  reward = jnp.where(valid, disagree.astype(jnp.float32),
                     jnp.asarray(invalid_reward, jnp.float32))
  return reward, has_consensus & valid, disagree


@jax.jit
def add_soft_term(reward, target_nll, has_consensus, valid, weight):
  """reward + weight * (1 - p_target(consensus)) where a consensus exists:
  the probability that the target does not give the consensus answer, a
  bounded, dense version of the 0/1 disagreement (`target_nll` is
  -log p_target(consensus))."""
  soft = 1.0 - jnp.exp(-jnp.maximum(jnp.asarray(target_nll, jnp.float32), 0.0))
  return jnp.where(has_consensus & valid, reward + weight * soft, reward)


def judge_name(rcfg: RewardConfig, references: Sequence[str]) -> str:
  """The judging model: `rcfg.judge`, or the first reference when unset."""
  if rcfg.judge:
    return rcfg.judge
  if not references:
    raise ValueError("judge mode without `judge` needs a reference model to judge")
  return references[0]


def judge_prompt(answer_a: str, answer_b: str) -> str:
  return f"do the answers {spoken_key(answer_a)!r} and {spoken_key(answer_b)!r} mean the same?"


def judge_same_prob(scorer, images, answers_a: Sequence[str], answers_b: Sequence[str],
                    yes: str = "yes", no: str = "no", batch_size: int | None = None
                    ) -> np.ndarray:
  """p(yes) / (p(yes) + p(no)) under a model asked whether two answers mean
  the same. `scorer` is a Sampler (or VLM) with a tokenizer; its `score` is
  the jitted (sharded) forward pass. With `batch_size`, rows go in calls of
  exactly `batch_size` pairs (the last one padded by repeating its first
  row), so every call has one shape."""
  tok = scorer.tokenizer
  if tok is None:
    raise ValueError("judge mode needs a judge model with a tokenizer")
  prompts = [tok.prompt(judge_prompt(a, b)) for a, b in zip(answers_a, answers_b, strict=True)]
  n = len(prompts)
  if n == 0:
    return np.zeros(0, np.float32)
  images = np.asarray(images)
  cfg = getattr(scorer, "cfg", None) or getattr(scorer, "config", None)
  if cfg is not None:
    images = fit_images(images, cfg.vision.image_size)
  size = n if batch_size is None else int(batch_size)
  y, o = tok.answer(yes), tok.answer(no)
  out = []
  for start in range(0, n, size):
    stop = min(start + size, n)
    idx = list(range(start, stop)) + [start] * (size - (stop - start))
    m = len(idx)
    lp = scorer.score(np.concatenate([images[idx], images[idx]]),
                      [prompts[i] for i in idx] * 2, [y] * m + [o] * m)
    lp_yes = np.array([x.sum() for x in lp[:m]])
    lp_no = np.array([x.sum() for x in lp[m:]])
    out.append((1.0 / (1.0 + np.exp(lp_no - lp_yes)))[:stop - start])
  return np.concatenate(out).astype(np.float32)


class ModelJudge:
  """A model as the judge: `same_prob(images, answers_a, answers_b)` -> float32
  [n] p(same meaning) (`judge_same_prob` through the model's Sampler, in
  fixed batches of `batch_size` pairs). Any object with this `same_prob`
  (and a `name`) can judge, e.g. a scripted one in tests."""

  def __init__(self, scorer, name: str = "", batch_size: int = 32):
    self.scorer, self.name, self.batch_size = scorer, name, int(batch_size)

  def same_prob(self, images, answers_a: Sequence[str], answers_b: Sequence[str]) -> np.ndarray:
    return judge_same_prob(self.scorer, images, answers_a, answers_b,
                           batch_size=self.batch_size)
