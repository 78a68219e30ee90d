"""Rounds: with `rounds = N > 1`, `all` repeats audit -> mine -> rectify N - 1
more times, each in `<workdir>/rounds/r<r>`, against the improved target."""

from __future__ import annotations

import os

from auditdm_jax import sharding
from auditdm_jax.pipeline import layout
from auditdm_jax.utils import chaos

def prepare_round(config, workdir: str, r: int) -> str:
  """The workdir of round r >= 2: `<workdir>/rounds/r<r>`, whose models/ and
  data/ link to the main workdir's, except that the audited target is the
  previous round's rectified target (its unchanged target when that round
  found nothing to train on) and the auditor starts from the previous
  round's trained auditor; `mine_earlier/r<k>` links each earlier round's
  exemplar store (rectify trains on them too)."""
  prev = layout.round_dir(workdir, r - 1)
  rdir = layout.round_dir(workdir, r)
  target = layout.audit_target(config)
  links = {"data": os.path.join(workdir, "data")}
  for name in config.models:
    links[os.path.join("models", name)] = layout.model_dir(workdir, name)
  rect = layout.model_dir(prev, layout.rectified_name(target))
  if not os.path.exists(rect):   # the previous round found nothing to train on
    rect = os.path.realpath(layout.model_dir(prev, target))
  links[os.path.join("models", target)] = rect
  for aud in layout.roles(config, "auditor"):
    links[os.path.join("models", aud)] = layout.model_dir(prev, layout.trained_name(aud))
  # The exemplar stores of the earlier rounds: rectification trains on all of
  # them, so a round does not undo what an earlier one repaired.
  for k in range(1, r):
    links[os.path.join(layout.EARLIER_STORES, f"r{k}")] = layout.published_path(
        layout.round_dir(workdir, k))
  for dest in links.values():
    if not os.path.exists(dest):
      raise FileNotFoundError(f"round {r} needs {dest}, which round {r - 1} did not write")
  if sharding.is_primary():   # one process links, the others wait
    os.makedirs(os.path.join(rdir, "models"), exist_ok=True)
    os.makedirs(os.path.join(rdir, layout.EARLIER_STORES), exist_ok=True)
    for rel, dest in links.items():
      link = os.path.join(rdir, rel)
      if os.path.islink(link) and os.readlink(link) != dest:
        os.unlink(link)
      if not os.path.lexists(link):
        chaos.point("round_link")
        os.symlink(dest, link)
  sharding.barrier(f"auditdm round {r} links")
  return rdir


def schedule(stages, rounds: int):
  """(stage name, round, key) in the order `all` runs them: every stage in
  order, and right after the last stage that rounds repeat (`in_rounds`),
  rounds 2..N of those stages, keyed `<stage>_r<r>`."""
  loop = [s.name for s in stages if s.in_rounds]
  for stage in stages:
    yield stage.name, 1, stage.name
    if loop and stage.name == loop[-1]:
      for r in range(2, rounds + 1):
        for name in loop:
          yield name, r, f"{name}_r{r}"
