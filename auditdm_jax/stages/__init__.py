"""The pipeline's stages, in order, and which of them exist yet.

Each stage reads the previous stages' outputs from the workdir and writes its
own, so any stage can be rerun alone. Stages that are planned but not built
are listed with the issue that builds them; asking for one fails with that
message instead of pretending.
"""

from __future__ import annotations

from collections.abc import Callable

from auditdm_jax.stages import (
  audit,
  evaluate,
  init_models,
  mine,
  pretrain,
  rectify,
  report,
)

ORDER = ("init", "pretrain", "audit", "mine", "rectify", "eval", "report")

IMPLEMENTED: dict[str, Callable] = {
    "init": init_models.run,
    "pretrain": pretrain.run,
    "audit": audit.run,
    "mine": mine.run,
    "rectify": rectify.run,
    "eval": evaluate.run,
    "report": report.run,
}

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
