"""Failure types: naming, grouping and ranking the mined probes.

Every consensus-backed probe (references agree; see `stages.mine`) is one
`Probe`: its question's skill, the pseudo-label (the normalised consensus),
the visual factor its edit or caption changed, and which targets disagreed.
A probe's *category* is what a person would call it: "colour: purple, after
a recolour edit" (the skill of the question, the answer the references give,
and the visual factor the auditor's edit or caption changed, if any).
Similar categories are then grouped into failure types: the visual factors of
one skill and answer form one type ("colour: purple"; the factors are kept as
counts), and within a skill whose answers are ordered numbers (counting),
adjacent answers on which the target fails at the same high rate merge into
one range ("counting: 4-6"). Besides these answer types, *attribute types*
gather a skill's probes by an attribute the question names of its subject
("shape: colour=green": shape questions about green objects), for failures
that follow what is asked about rather than what is answered; one is kept
only where most of its failures are not already in a better-ranked type.

Per failure type and target: `probes` (consensus-backed probes of the type),
`failures` (probes where the target differs from the consensus), `rate`
(failures / probes) and `share` (the target's rate normalised over the
targets, the paper's 3B-vs-28B comparison: shares of one type sum to 1) and
`excess` (failures - probes x the target's base rate, its failure rate over
all probes: the failures the type holds beyond what an average type of that
size would) and `score` (the Wilson lower bound of the type's failure rate
minus the base rate). Types are ranked by the focus target's score: by how
reliably the target fails there beyond its usual rate, so a big type it
fails at its usual rate (a habit of the references, a skill asked often)
does not crowd out a small type it fails every time, and three failures of
three probes do not outrank thirty of thirty.

Nothing here reads the ground truth; `gap_recall` / `exemplar_precision`
measure the result against a world's truth (planted gaps, exact answers;
the scene world's, passed in by the stage as a `Knowledge`), which the
auditor and the grouping never see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from auditdm_jax.utils.answers import answer_key

UNKNOWN_SKILL = "other"


@dataclasses.dataclass(frozen=True)
class Probe:
  id: str
  skill: str                 # the question's skill ("" if the world cannot tell)
  label: str                 # the normalised consensus answer
  factor: str                # the visual factor changed ("" for a plain question)
  failed: tuple[str, ...]    # targets whose answer differs from the consensus
  named: tuple[tuple[str, str], ...] = ()   # attributes the question names of its
                                            # subject, e.g. (("colour", "green"),)


@dataclasses.dataclass
class FailureType:
  name: str
  skill: str
  labels: tuple[str, ...]
  probes: int
  failures: dict[str, int]
  rate: dict[str, float]
  share: dict[str, float]
  factors: dict[str, int]    # visual factor -> failures of the focus target
  ids: list[str]             # the focus target's failure exemplars, in mining order
  excess: dict[str, float] = dataclasses.field(default_factory=dict)  # beyond base rate
  score: dict[str, float] = dataclasses.field(default_factory=dict)   # ranking score
  attribute: tuple[str, str] | None = None   # (key, value) of an attribute type

  def count(self, target: str) -> int:
    return self.failures.get(target, 0)

  def to_json(self, focus: str) -> dict:
    return {"name": self.name, "skill": self.skill, "labels": list(self.labels),
            "attribute": list(self.attribute) if self.attribute else None,
            "count": self.count(focus), "probes": self.probes, "failures": self.failures,
            "rate": self.rate, "share": self.share, "excess": self.excess,
            "score": self.score,
            "factors": self.factors, "examples": self.ids[:8]}


FACTOR_WORDS = {"scene": "a regenerated scene"}


def category(skill: str, label: str, factor: str = "") -> str:
  """"colour: purple" or, with the factor an edit changed, "colour: purple,
  after a colour edit"."""
  name = f"{skill or UNKNOWN_SKILL}: {label}"
  if factor:
    name += f", after {FACTOR_WORDS.get(factor, f'a {factor} edit')}"
  return name


def _is_num(label: str) -> bool:
  return label.isdigit()


def _make(skill: str, labels: Sequence[str], members: Sequence[Probe],
          targets: Sequence[str], focus: str,
          attribute: tuple[str, str] | None = None) -> FailureType:
  fails = {t: sum(t in p.failed for p in members) for t in targets}
  n = len(members)
  rate = {t: fails[t] / n if n else float("nan") for t in targets}
  total = sum(rate.values())
  share = {t: (rate[t] / total if total > 0 else 0.0) for t in targets}
  factors: dict[str, int] = {}
  for p in members:
    if focus in p.failed:
      factors[p.factor or "none"] = factors.get(p.factor or "none", 0) + 1
  if attribute:
    name = f"{skill or UNKNOWN_SKILL}: {attribute[0]}={attribute[1]}"
  elif len(labels) == 1:
    name = category(skill, labels[0])
  else:
    name = f"{skill or UNKNOWN_SKILL}: {labels[0]}-{labels[-1]}"
  return FailureType(name=name, skill=skill or UNKNOWN_SKILL, labels=tuple(labels),
                     probes=n, failures=fails, rate=rate, share=share, factors=factors,
                     ids=[p.id for p in members if focus in p.failed], attribute=attribute)


def group(probes: Sequence[Probe], targets: Sequence[str], focus: str,
          merge_rate: float = 0.5, min_probes: int = 3) -> list[FailureType]:
  """Failure types of `probes`, ranked for the focus target (`rank_types`).
  Adjacent numeric answers of one skill merge when the focus target fails on
  each at >= merge_rate (each with >= min_probes probes); attribute types
  need >= min_probes probes too."""
  if focus not in targets:
    raise ValueError(f"focus target {focus!r} is not among the targets {list(targets)}")
  by_cat: dict[tuple[str, str], list[Probe]] = {}
  for p in probes:
    by_cat.setdefault((p.skill, p.label), []).append(p)
  out = []
  for skill in sorted({s for s, _ in by_cat}):
    labels = sorted((lab for s, lab in by_cat if s == skill),
                    key=lambda x: (not _is_num(x), int(x) if _is_num(x) else 0, x))
    groups: list[list[str]] = []
    last_hot = False
    for lab in labels:
      members = by_cat[(skill, lab)]
      hot = (_is_num(lab) and len(members) >= min_probes and
             sum(focus in p.failed for p in members) / len(members) >= merge_rate)
      if hot and last_hot and int(lab) == int(groups[-1][-1]) + 1:
        groups[-1].append(lab)
      else:
        groups.append([lab])
      last_hot = hot
    for labs in groups:
      members = [p for lab in labs for p in by_cat[(skill, lab)]]
      out.append(_make(skill, labs, members, targets, focus))
  # Attribute types: a skill's probes whose question names one value of an
  # attribute of its subject ("shape: colour=green"), for gaps that follow
  # what is asked about rather than the answer.
  by_attr: dict[tuple[str, str, str], list[Probe]] = {}
  for p in probes:
    for key, value in p.named:
      by_attr.setdefault((p.skill, key, value), []).append(p)
  attr_types = [_make(skill, (), members, targets, focus, (key, value))
                for (skill, key, value), members in sorted(by_attr.items())
                if len(members) >= min_probes]
  score_types(out + attr_types, probes, targets)
  # An attribute type is kept only where it explains failures the answer
  # types ranked above it do not: at most half of its focus failures may
  # already lie in better types (else it is a re-cut of them).
  kept, covered = [], set()
  for ty in rank_types(out + attr_types, focus):
    ids = set(ty.ids)
    if ty.attribute is not None and (not ids or ty.score.get(focus, 0.0) <= 0
                                     or len(ids & covered) > len(ids) / 2):
      continue
    kept.append(ty)
    if ty.score.get(focus, 0.0) > 0:
      covered |= ids
  return rank_types(kept, focus)


def score_types(types: Sequence[FailureType], probes: Sequence[Probe],
                targets: Sequence[str]) -> None:
  """Fills each type's `excess` and `score` per target, against the target's
  base rate over all of `probes` (which may hold probes of no type)."""
  n_all = max(len(probes), 1)
  for t in targets:
    base = sum(t in p.failed for p in probes) / n_all
    for ty in types:
      ty.excess[t] = ty.count(t) - ty.probes * base
      ty.score[t] = wilson_lower(ty.count(t), ty.probes) - base


def make_type(name: str, members: Sequence[Probe], targets: Sequence[str], focus: str
              ) -> FailureType:
  """A failure type of any grouping of probes (e.g. an embedding cluster):
  counts, rates and shares as for the answer types, named `name`; its skill
  is the members' one skill, or UNKNOWN_SKILL when they have none or several;
  its labels are the members' consensus answers, most common first."""
  skills = {p.skill for p in members}
  skill = skills.pop() if len(skills) == 1 else ""
  counts: dict[str, int] = {}
  for p in members:
    counts[p.label] = counts.get(p.label, 0) + 1
  ty = _make(skill, ("",), members, targets, focus)
  ty.name = name
  ty.labels = tuple(sorted(counts, key=lambda lab: (-counts[lab], lab)))
  return ty


def wilson_lower(k: int, n: int, z: float = 1.96) -> float:
  """The Wilson score interval's lower end for k successes in n trials (0 when
  n is 0): a failure rate that small types must earn with enough probes."""
  if n <= 0:
    return 0.0
  p = k / n
  centre = p + z * z / (2 * n)
  margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return float((centre - margin) / (1 + z * z / n))


def wilson_upper(k: int, n: int, z: float = 1.96) -> float:
  """The Wilson score interval's upper end (1 when n is 0)."""
  return 1.0 - wilson_lower(n - k, n, z) if n > 0 else 1.0


def rank_types(types: Sequence[FailureType], target: str) -> list[FailureType]:
  """Best first for `target`: by `score` (the Wilson lower bound of its failure
  rate on the type, minus its failure rate over all probes), then failures,
  then name."""
  return sorted(types, key=lambda t: (-t.score.get(target, 0.0), -t.count(target), t.name))


# -- measured against the truth ------------------------------------------------------

TruthFn = Callable[[str], "tuple[str, object, str] | None"]   # id -> (skill, facets, answer)


@dataclasses.dataclass(frozen=True)
class Knowledge:
  """What a world with ground truth tells the mining; the stage passes the
  scene world's (`scenes/mining.py`). `attributes(question)`: the attributes
  the question names of its subject ({"colour": "green"}; `Probe.named`,
  from the question's words, not the truth); `truth_of(records_by_id)`: the
  TruthFn of those records (measurement only)."""

  attributes: Callable[[str], Mapping[str, str]]
  truth_of: Callable[[Mapping[str, Mapping]], TruthFn]


def gap_recall(types: Sequence[FailureType], target: str, gaps: Sequence,
               truth: TruthFn, top_k: int, purity: float = 0.5) -> dict[str, dict]:
  """For each planted gap of `target` (parsed specs: `spec.matches(skill,
  facets)`, named by `str(spec)`; the scene world's `gaps.parse_gaps`):
  found when one of the target's top_k failure types (ranked for it,
  `rank_types`) holds mostly (>= purity) exemplars that lie in the gap's
  slice by the ground truth."""
  ranked = rank_types(types, target)[:top_k]
  out = {}
  for spec in gaps:
    hit = None
    for rank, t in enumerate(ranked, 1):
      known = [truth(i) for i in t.ids]
      known = [k for k in known if k is not None]
      if not known or t.count(target) == 0:
        continue
      inside = np.mean([spec.matches(k[0], k[1]) for k in known])
      if inside >= purity:
        hit = {"found": True, "rank": rank, "type": t.name, "purity": float(inside)}
        break
    out[str(spec)] = hit or {"found": False, "rank": None, "type": None, "purity": None}
  return out


def exemplar_precision(exemplars: Sequence[Mapping], target: str, truth: TruthFn
                       ) -> dict[str, float | int]:
  """Among the exemplars where `target` failed (by the consensus): the
  fraction where it is wrong by the ground truth ("precision"), and the
  fraction whose pseudo-label is the ground truth ("label_precision")."""
  wrong, label_ok, n = 0, 0, 0
  for e in exemplars:
    if target not in e["failed"]:
      continue
    t = truth(e["id"])
    if t is None:
      continue
    answer = answer_key(t[2])
    n += 1
    wrong += answer_key(e["answers"][target]) != answer
    label_ok += answer_key(e["pseudo_label"]) == answer
  nan = float("nan")
  return {"precision": wrong / n if n else nan, "label_precision": label_ok / n if n else nan,
          "exemplars_with_truth": n}
