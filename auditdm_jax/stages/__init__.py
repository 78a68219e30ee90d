"""The pipeline's stages, in order, each declared by its module's `STAGE`
(`pipeline.spec.Stage`: what it reads and writes, its defaults, its config
problems, whether rounds repeat it).

Each stage reads the previous stages' outputs from the workdir and writes its
own, so any stage can be rerun alone. No stage imports another: what they
share lives in `auditdm_jax.pipeline` and the packages below it. Stages that
are planned but not built are listed with the issue that builds them; asking
for one fails with that message instead of pretending.
"""

from __future__ import annotations

from collections.abc import Callable

from auditdm_jax.pipeline.spec import Stage
from auditdm_jax.stages import audit, evaluate, init_models, mine, pretrain, rectify, report

STAGES: tuple[Stage, ...] = (init_models.STAGE, pretrain.STAGE, audit.STAGE, mine.STAGE,
                             rectify.STAGE, evaluate.STAGE, report.STAGE)
ORDER = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
IMPLEMENTED: dict[str, Callable] = {s.name: s.run for s in STAGES if s.status == "built"}
LOOP = tuple(s.name for s in STAGES if s.in_rounds)   # what rounds 2..N repeat

# Stages that are designed but not built yet: {name: the issue that builds it}.
PLANNED: dict[str, str] = {}


class StageNotImplemented(RuntimeError):
  pass


def get(name: str) -> Callable:
  if name in IMPLEMENTED:
    return IMPLEMENTED[name]
  if name in PLANNED:
    raise StageNotImplemented(f"stage {name!r} is not implemented yet: it comes "
                              f"with {PLANNED[name]}")
  raise ValueError(f"unknown stage {name!r}; stages are {ORDER + ('all',)}")


def table() -> str:
  """The stage table of docs/architecture.md, from the declarations."""
  head = ["| stage    | status                 | reads                      | writes (in the "
          "workdir)                 |",
          "|----------|------------------------|----------------------------|---------------"
          "--------------------------|"]
  return "\n".join(head + [s.table_row() for s in STAGES])
