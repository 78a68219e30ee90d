"""Naming a failure type: namers (the auditor's question route, an
instruction-tuned chat model) write candidates, `validation.validate` keeps
those that separate members from non-members, else a descriptive name."""

from __future__ import annotations

import collections
import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.mine.clusters.config import DESCRIPTIVE, Ask
from auditdm_jax.mine.clusters.validation import Candidate, Namer, validate
from auditdm_jax.utils.answers import answer_key


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
