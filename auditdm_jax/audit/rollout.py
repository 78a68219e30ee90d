"""One round of auditing: the auditor writes, the editor renders, the models
answer, the reward scores.

Pairings (the paper's (Q*, I), (Q, I*), (Q*, I*)):

  question          Q* = A(I, p_question)                       -> (Q*, I)
  edit              e = A(I, p_edit), I_e = E(I, e)             -> (Q, I_e)
  edit_question     e, I_e as above, Q* = A(I_e, p_question)    -> (Q*, I_e)
  caption           C = A(I, p_caption), I_g = G(C)             -> (Q, I_g)
  caption_question  C, I_g as above, Q* = A(I_g, p_question)    -> (Q*, I_g)

Q is the seed's own question. Each seed gets one pairing (drawn from the
mixture) and K auditor samples of its first text (one GRPO group); a
two-text pairing samples one question per rendered image, and both texts
share the sample's reward. A sample is invalid when a text is rejected (an
edit that does not apply, a caption that does not parse, a question the
editor's world cannot pose) and then gets RewardConfig.invalid_reward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from auditdm_jax.audit import diversity as diversity_lib
from auditdm_jax.audit import reward as reward_lib
from auditdm_jax.audit.editor import Editor
from auditdm_jax.eval.benchmark import generate_text, strip_stops
from auditdm_jax.models.inputs import default_stop_ids, fit_images
from auditdm_jax.sampling import Sampler, SamplingParams
from auditdm_jax.utils import draws
from auditdm_jax.utils.answers import answer_key

PAIRINGS: dict[str, tuple[str, ...]] = {
    "question": ("question",),
    "edit": ("edit",),
    "edit_question": ("edit", "question"),
    "caption": ("caption",),
    "caption_question": ("caption", "question"),
}


def check_mixture(mixture: Mapping[str, float]) -> dict[str, float]:
  """{pairing: probability}, normalised; unknown pairings or bad weights raise."""
  mixture = dict(mixture)
  bad = [k for k in mixture if k not in PAIRINGS]
  if bad:
    raise ValueError(f"unknown pairings {bad} in the audit mixture; known: {list(PAIRINGS)}")
  if any(not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0
         for v in mixture.values()) or sum(mixture.values()) <= 0:
    raise ValueError(f"audit mixture weights must be finite, >= 0 and not all 0, "
                     f"got {mixture}")
  total = float(sum(mixture.values()))
  return {k: float(v) / total for k, v in mixture.items() if v > 0}


def pairing_counts(mixture: Mapping[str, float], n: int, rng: np.random.Generator
                   ) -> dict[str, int]:
  """How many of n seeds get each pairing: systematic sampling, so each count
  is floor or ceil of n * p (unbiased, and never more than `max_counts`)."""
  return draws.systematic_counts(mixture, n, rng)


def max_counts(mixture: Mapping[str, float], n: int) -> dict[str, int]:
  """The most seeds of n that `pairing_counts` can give each pairing."""
  return {k: int(np.ceil(v * n - 1e-9)) for k, v in mixture.items()}


def draw_pairings(mixture: Mapping[str, float], n: int, rng: np.random.Generator) -> list[str]:
  """n pairings in the mixture's proportions (`pairing_counts`), shuffled."""
  return draws.systematic_draw(mixture, n, rng)


def second_text_budget(mixture: Mapping[str, float], seeds: int, k: int) -> int:
  """The GRPO rows a step needs for second texts: K per seed of a two-text
  pairing, at most (`max_counts`), so the packed batch has a fixed shape."""
  most = max_counts(mixture, seeds)
  return k * sum(c for p, c in most.items() if len(PAIRINGS[p]) == 2)


@dataclasses.dataclass
class Seed:
  image: np.ndarray     # uint8 [H, W, 3]
  context: object       # the editor's context (scene JSON)
  question: str         # the seed question Q


@dataclasses.dataclass
class Rollout:
  """B seeds x K samples = N rows (row i belongs to seed i // K)."""

  pairings: list[str]                 # [N]
  texts: list[list[str]]              # [N] the auditor's texts, in order
  tokens: list[list[list[int]]]       # [N] completion ids per text (with the stop id)
  prompts: list[list[list[int]]]      # [N] prompt ids per text
  images_in: list[list[np.ndarray]]   # [N] the image each text was written for
  question: list[str]                 # [N] the question finally asked
  image: np.ndarray                   # [N, H, W, 3] the image finally shown
  context: list                       # [N] its context
  valid: np.ndarray                   # bool [N]
  reason: list[str]                   # [N] why invalid ("" if valid)
  factor: list[str]                   # [N] the visual factor an edit changed
  answers: dict[str, list[str]]       # model name -> [N] answers, as generated
  parsed: dict[str, list[str]]        # model name -> [N] extracted answers ("" unparseable)
  reward: np.ndarray                  # float32 [N]
  has_consensus: np.ndarray           # bool [N]
  success: np.ndarray                 # bool [N]: consensus-backed disagreement
  consensus: list[str]                # [N] the consensus answer ("" if none)
  answered: np.ndarray                # bool [N]: the target's answer parses
  # The exact comparison's decision (consensus-backed, answered, different
  # normalised answer); in exact mode it is `success` itself.
  exact_success: np.ndarray | None = None               # bool [N]
  # Judge mode: every judged answerer (the non-references) -> float32 [N]
  # p(its answer means the consensus): 1 where the exact comparison finds
  # them equal or there is nothing to judge; and bool [N], the rows the
  # judge was asked. Empty in exact mode.
  p_same: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  judged: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # [N] the descriptor the row's question was asked through ("": the generic
  # prompt, or no question written by the auditor; `audit.diversity`).
  descriptor: list[str] | None = None

  def __post_init__(self):
    if self.exact_success is None:
      self.exact_success = np.asarray(self.success).copy()
    if self.descriptor is None:
      self.descriptor = [""] * len(self.pairings)

  @property
  def n(self) -> int:
    return len(self.pairings)


def decode_rows(tok, rows, stops) -> list[str]:
  """Sampled token rows -> texts, each cut at its first stop id."""
  return [tok.decode(strip_stops(r, stops)) for r in rows]


def _completion(row: Sequence[int], length: int) -> list[int]:
  return [int(t) for t in row[:length]]


def consensus_text(ref_answers: Sequence[Sequence[str]], rule: str) -> tuple[list[str], np.ndarray]:
  """Per row, the consensus of the references' answers ("" if none), by the
  same rule as the jitted reward (on normalised text)."""
  n = len(ref_answers[0])
  out, has = [], np.zeros(n, bool)
  for i in range(n):
    votes = [answer_key(a[i]) for a in ref_answers]
    counts = {v: votes.count(v) for v in votes if v}
    best = max(counts, key=counts.get) if counts else ""
    c = counts.get(best, 0)
    ok = c == len(votes) if rule == "unanimous" else 2 * c > len(votes)
    out.append(best if ok else "")
    has[i] = ok
  return out, has


class Auditing:
  """The models of an audit and one `run(seeds, pairings, rng)` round.

  auditor: a Sampler over the auditor's policy params (the caller refreshes
  `auditor.params`); answerers: {name: Sampler} of the target and the
  references; the reward compares `target` against `references`. In judge
  mode (`rcfg.mode == "judge"`), `judge` (a `reward.ModelJudge`, or any
  object with its `same_prob`) decides, for every answerer that is not a
  reference, the rows where its answer and the consensus differ exactly.
  `diversity` (`diversity.DiversityConfig`): the prompt a descriptor's
  question is asked through (`run(..., descriptors=...)`). `tasks`: the
  auditor's prompt of each route, {"question", "edit", "caption"} -> text
  (the world's, e.g. `scenes.text.AUDITOR_TASKS`; chosen by the stage).
  """

  def __init__(self, auditor: Sampler, answerers: Mapping[str, Sampler], target: str,
               references: Sequence[str], editor: Editor, rcfg: reward_lib.RewardConfig,
               num_samples: int, temperature: float = 1.0, max_new_tokens: int = 40,
               answer_tokens: int = 4, batch_size: int = 256, judge=None,
               diversity: diversity_lib.DiversityConfig | None = None,
               *, tasks: Mapping[str, str]):
    self.diversity = diversity or diversity_lib.DiversityConfig()
    missing = sorted({r for p in PAIRINGS.values() for r in p} - set(tasks))
    if missing:
      raise ValueError(f"the auditor's tasks lack a prompt for the routes {missing}")
    self.tasks = dict(tasks)
    if target not in answerers or any(r not in answerers for r in references):
      raise ValueError(f"target {target!r} and references {list(references)} must be "
                       f"among the answerers {list(answerers)}")
    if not references:
      raise ValueError("an audit needs at least one reference model")
    if rcfg.mode == "judge" and judge is None:
      raise ValueError("RewardConfig(mode='judge') needs a judge (reward.ModelJudge)")
    self.judge = judge if rcfg.mode == "judge" else None
    self.auditor, self.answerers = auditor, dict(answerers)
    self.target, self.references = target, list(references)
    self.editor, self.rcfg = editor, rcfg
    self.k = int(num_samples)
    self.sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                             num_samples=self.k)
    self.sp1 = dataclasses.replace(self.sp, num_samples=1)
    self.answer_sp = SamplingParams(max_new_tokens=answer_tokens, temperature=0.0)
    self.batch_size = batch_size
    tok = auditor.tokenizer
    if tok is None:
      raise ValueError("the auditor has no tokenizer")
    self.tok = tok
    self.stops = set(default_stop_ids(auditor.cfg, tok))
    for name in [target, *self.references]:
      if self.answerers[name].tokenizer is None:
        raise ValueError(f"answerer {name!r} has no tokenizer")

  # -- pieces ------------------------------------------------------------------
  def _sample(self, images, prompts, params: SamplingParams, rng):
    out = self.auditor.sample(images, prompts, params, rng=rng)
    rows = [_completion(out.tokens[i], out.lengths[i]) for i in range(len(out.lengths))]
    return rows, decode_rows(self.tok, rows, self.stops)

  def answer(self, images, questions) -> dict[str, list[str]]:
    out = {}
    for name, s in self.answerers.items():
      prompts = [s.tokenizer.prompt(q if q.strip() else "?") for q in questions]
      out[name] = generate_text(s, fit_images(images, s.cfg.vision.image_size), prompts, self.answer_sp,
                                min(self.batch_size, len(prompts)))
    return out

  def parse(self, answers: Mapping[str, Sequence[str]], contexts, questions
            ) -> dict[str, list[str]]:
    """Every model's answers read through each question's answer space
    (`reward.extract_answer`; "" = unparseable)."""
    spaces = self.editor.answer_space(contexts, questions)
    return {m: [reward_lib.extract_answer(a, sp) for a, sp in zip(v, spaces, strict=True)]
            for m, v in answers.items()}

  @property
  def judged_models(self) -> list[str]:
    """The answerers the judge decides for (judge mode): every non-reference."""
    return [m for m in self.answerers if m not in self.references]

  def exact(self, answers: Mapping[str, Sequence[str]], valid, model: str | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exact reward, has_consensus, exact disagreement) of `model` (default
    the target) on parsed answers: the jitted `disagreement_reward`."""
    rc = self.rcfg
    enc = lambda texts: reward_lib.encode_answers(texts, length=rc.max_answer_tokens)
    ref_ids = np.stack([enc(answers[r]) for r in self.references])
    tgt_ids = enc(answers[self.target if model is None else model])
    reward, has, disagree = reward_lib.disagreement_reward(
        tgt_ids, ref_ids, np.asarray(valid), rc.invalid_reward, rule=rc.consensus)
    return np.asarray(reward), np.asarray(has), np.asarray(disagree)

  def judge_rows(self, images, answers: Sequence[str], cons: Sequence[str], rows
                 ) -> np.ndarray:
    """float32 [N]: the judge's p(answers[i] means cons[i]) on `rows` (bool
    [N]), 1 elsewhere; no judge call when no row is asked."""
    p = np.ones(len(answers), np.float32)
    idx = np.nonzero(np.asarray(rows))[0]
    if len(idx):
      p[idx] = self.judge.same_prob(np.asarray(images)[idx], [answers[i] for i in idx],
                                    [cons[i] for i in idx])
    return p

  def score(self, answers: Mapping[str, Sequence[str]], valid, images=None
            ) -> dict[str, np.ndarray]:
    """The jitted reward of parsed (`parse`) answers. Judge mode (needs the
    images): the judge decides the rows where the exact comparison finds a
    consensus-backed disagreement, for the target and every other
    non-reference answerer, and `judged_reward` pays the target's."""
    rc = self.rcfg
    valid = np.asarray(valid)
    reward, has, disagree = self.exact(answers, valid)
    out = {"reward": reward, "has_consensus": has, "success": disagree,
           "exact_success": disagree, "p_same": {}, "judged": {}}
    if rc.mode != "judge":
      return out
    if images is None:
      raise ValueError("judge mode scores with the images the models saw")
    cons, _ = consensus_text([answers[r] for r in self.references], rc.consensus)
    for m in self.judged_models:
      rows = disagree if m == self.target else self.exact(answers, valid, m)[2]
      out["judged"][m] = rows
      out["p_same"][m] = self.judge_rows(images, answers[m], cons, rows)
    reward, has, success = reward_lib.judged_reward(
        out["p_same"][self.target], has, valid, rc.invalid_reward, rc.judge_threshold)
    out.update(reward=np.asarray(reward), has_consensus=np.asarray(has),
               success=np.asarray(success))
    return out

  def target_nll(self, images, questions, answers, parsed, cons) -> np.ndarray:
    """float32 [N]: -log p_target(the consensus answer, as a reference wrote
    it) where a consensus exists, else 0 (one scoring pass of the target)."""
    n = len(questions)
    nll = np.zeros(n, np.float32)
    idx = [i for i in range(n) if cons[i]]
    if not idx:
      return nll
    s = self.answerers[self.target]
    label = [next(answers[r][i] for r in self.references if parsed[r][i] == cons[i])
             for i in idx]
    # Fixed shapes: score every row, with a placeholder answer where there
    # is no consensus (its value is discarded).
    text = [""] * n
    for i, t in zip(idx, label):
      text[i] = t
    fill = label[0]
    lp = s.score(fit_images(np.asarray(images), s.cfg.vision.image_size),
                 [s.tokenizer.prompt(q if q.strip() else "?") for q in questions],
                 [s.tokenizer.answer(t or fill) for t in text])
    for i in idx:
      nll[i] = -float(np.sum(lp[i]))
    return nll

  # -- one round ---------------------------------------------------------------
  def question_prompt(self, descriptor: str = "") -> str:
    """The question prompt of a descriptor ("": the generic one)."""
    return self.diversity.prompt_text(descriptor, self.tasks["question"])

  def _render_first(self, image, context, pair, texts1):
    """Renders what each row's first text asks for (its edit or caption), in
    place in `image` and `context`: (valid, reason, factor) per row."""
    n = len(pair)
    valid = np.ones(n, bool)
    reason, factor = [""] * n, [""] * n
    for route in ("edit", "caption"):
      idx = [i for i in range(n) if PAIRINGS[pair[i]][0] == route]
      if not idx:
        continue
      if route == "edit":
        res = self.editor.edit(image[idx], [texts1[i] for i in idx], [context[i] for i in idx])
      else:
        res = self.editor.generate([texts1[i] for i in idx])
      for i, r in zip(idx, res):
        if r.ok:
          image[i], context[i], factor[i] = r.image, r.context, r.factor
        else:
          valid[i], reason[i] = False, f"{route}: {r.reason}"
    return valid, reason, factor

  def _second_texts(self, pair, image, seed_of, descriptors, rng, texts, toks, prm, imgs_in,
                    question) -> None:
    """The two-text rows' second text, a question about the rendered image,
    appended in place (and made the row's question)."""
    two = [i for i in range(len(pair)) if len(PAIRINGS[pair[i]]) == 2]
    if not two:
      return
    qprompts = [self.tok.prompt(self.question_prompt(descriptors[s])) for s in seed_of]
    # Only the two-text rows, padded to a multiple of 8 rows (few shapes).
    pad = two + [two[0]] * (-len(two) % 8)
    rows2, texts2 = self._sample(image[pad], [qprompts[i] for i in pad], self.sp1, rng)
    for j, i in enumerate(two):
      texts[i].append(texts2[j])
      toks[i].append(rows2[j])
      prm[i].append(qprompts[i])
      imgs_in[i].append(image[i])
      question[i] = texts2[j]

  def _answer_and_score(self, image, question, context, valid):
    """(answers, parsed, scored, consensus) of the final questions. Invalid
    rows are not asked (their answers cannot matter): a placeholder keeps the
    batch shape, and every prompt within one length bucket."""
    asked = [q if ok else "" for q, ok in zip(question, valid)]
    answers = self.answer(image, asked)
    answers = {m: [a if ok else "" for a, ok in zip(v, valid)] for m, v in answers.items()}
    parsed = self.parse(answers, context, question)
    scored = self.score(parsed, valid, image)
    cons, _ = consensus_text([parsed[r] for r in self.references], self.rcfg.consensus)
    if self.rcfg.soft_weight:
      scored["reward"] = np.asarray(reward_lib.add_soft_term(
          scored["reward"], self.target_nll(image, asked, answers, parsed, cons),
          scored["has_consensus"], valid, self.rcfg.soft_weight))
    return answers, parsed, scored, cons

  def run(self, seeds: Sequence[Seed], pairings: Sequence[str], rng, num_samples=None,
          descriptors: Sequence[str] | None = None) -> Rollout:
    """K (or `num_samples`) samples per seed; pairing i applies to seed i,
    and seed i's questions are asked through descriptor i (default: all
    generic)."""
    k = self.k if num_samples is None else int(num_samples)
    sp = dataclasses.replace(self.sp, num_samples=k)
    if len(seeds) != len(pairings):
      raise ValueError(f"got {len(seeds)} seeds and {len(pairings)} pairings")
    descriptors = [""] * len(seeds) if descriptors is None else list(descriptors)
    if len(descriptors) != len(seeds):
      raise ValueError(f"got {len(seeds)} seeds and {len(descriptors)} descriptors")
    bad = [p for p in pairings if p not in PAIRINGS]
    if bad:
      raise ValueError(f"unknown pairings {sorted(set(bad))}; known: {list(PAIRINGS)}")
    rng1, rng2 = jax.random.split(rng)
    seed_images = np.stack([s.image for s in seeds])
    first = [PAIRINGS[p][0] for p in pairings]
    prompts1 = [self.tok.prompt(self.question_prompt(d) if r == "question"
                                else self.tasks[r]) for r, d in zip(first, descriptors)]
    rows1, texts1 = self._sample(seed_images, prompts1, sp, rng1)
    seed_of = np.arange(len(rows1)) // k
    pair = [pairings[s] for s in seed_of]
    image = seed_images[seed_of].copy()
    context = [seeds[s].context for s in seed_of]
    valid, reason, factor = self._render_first(image, context, pair, texts1)
    question = [texts1[i] if pair[i] == "question" else seeds[s].question
                for i, s in enumerate(seed_of)]
    texts, toks = [[t] for t in texts1], [[r] for r in rows1]
    prm = [[prompts1[s]] for s in seed_of]
    imgs_in = [[seed_images[s]] for s in seed_of]
    self._second_texts(pair, image, seed_of, descriptors, rng2, texts, toks, prm, imgs_in,
                       question)
    # Is the final question one the world can pose about the final image?
    for i, (ok, why) in enumerate(self.editor.check_question(context, question)):
      if valid[i] and not ok:
        valid[i], reason[i] = False, f"question: {why}"
    answers, parsed, scored, cons = self._answer_and_score(image, question, context, valid)
    return Rollout(pairings=pair, texts=texts, tokens=toks, prompts=prm, images_in=imgs_in,
                   question=question, image=image, context=context, valid=valid,
                   reason=reason, factor=factor, answers=answers, parsed=parsed,
                   reward=scored["reward"], has_consensus=scored["has_consensus"],
                   success=scored["success"], consensus=cons,
                   answered=np.array([bool(a) for a in parsed[self.target]]),
                   exact_success=scored["exact_success"], p_same=scored["p_same"],
                   judged=scored["judged"],
                   descriptor=[descriptors[s] if "question" in PAIRINGS[pair[i]] else ""
                               for i, s in enumerate(seed_of)])


def consensus_truth(roll: Rollout, editor: Editor) -> tuple[float, int]:
  """(fraction of the valid, consensus-backed probes whose consensus is the
  ground truth, #such probes with a known truth): how far the references can
  be trusted on the questions the auditor writes. Measurement only: the
  reward never sees the truth."""
  return _consensus_is_truth(roll, editor, roll.valid & roll.has_consensus)


def _consensus_is_truth(roll: Rollout, editor: Editor, rows) -> tuple[float, int]:
  """(fraction of `rows` whose consensus is the ground truth, #rows with a
  known truth); NaN when there are none."""
  idx = np.nonzero(rows)[0]
  truth = editor.ground_truth([roll.context[i] for i in idx], [roll.question[i] for i in idx])
  known = [(roll.consensus[i], t) for i, t in zip(idx, truth) if t is not None]
  if not known:
    return float("nan"), 0
  return float(np.mean([c == answer_key(t) for c, t in known])), len(known)


def precision_gt(roll: Rollout, editor: Editor) -> tuple[float, int]:
  """(fraction of successes whose consensus is the ground truth, #successes
  with a known ground truth); NaN when there are none."""
  return _consensus_is_truth(roll, editor, roll.success)
