"""Validating a candidate name: the references answer its probe on held-out
members and on non-members, and it is kept only if it separates them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from auditdm_jax.mine import failure_types as ft
from auditdm_jax.mine.clusters.config import Ask
from auditdm_jax.utils.answers import answer_key


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
