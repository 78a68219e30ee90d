"""VQA accuracy (VQAv2, OK-VQA) and exact match (GQA)."""

from __future__ import annotations

from auditdm_jax.eval.metrics.common import answer_key, answers_list, check_prediction


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
  """VQA accuracy of one question (official VQA evaluation, VQAv2 / OK-VQA):
  after `answers.vqa_official` of the prediction and of every answer, for each of
  the n ground-truth answers leave it out and score min(#matches among the
  other n-1 / 3, 1); the accuracy is the mean over the n leave-one-out sets.

  With ten answers of which k match: k=1 -> 0.3, k=2 -> 0.6, k=3 -> 0.9,
  k>=4 -> 1.0. Fewer answers follow the same formula (3 answers that all
  match give 2/3). With a single answer the only leave-one-out set is empty
  and the official code would score every prediction 0; here a single answer
  is scored by exact normalised match (1.0 or 0.0) instead.

  The answers are normalised fully and always. (The official script only
  re-normalises ground truth whose answers disagree, and only its
  punctuation, because the released annotations are already normalised; on
  those annotations the two agree.) An answer that normalises to "" compares
  by its raw text (`answer_key`), so an empty prediction never scores."""
  prediction = check_prediction(prediction)
  answers = answers_list(answers)
  pred = answer_key(prediction)
  hits = [answer_key(a) == pred for a in answers]
  if len(answers) == 1:
    return float(hits[0])
  total = sum(hits)
  # Leaving out a matching answer leaves total-1 matches, any other leaves total.
  acc = sum(min(1.0, (total - h) / 3.0) for h in hits) / len(hits)
  return float(acc)


def exact_match(prediction: str, answers: list[str]) -> float:
  """1.0 when the normalised prediction equals any normalised answer (GQA's
  official accuracy: exact match with the single gold answer; normalisation
  as `answers.vqa_official`, the way lmms-eval prepares GQA answers). `answers` may
  be a single str."""
  prediction = check_prediction(prediction)
  answers = answers_list(answers)
  pred = answer_key(prediction)
  return float(any(answer_key(a) == pred for a in answers))
