"""`Stage`: what a pipeline stage declares about itself.

Every stage module ends with one `STAGE = Stage(...)`: its name, its run
function, what it reads and writes, its config section's defaults, its
config problems and whether rounds repeat it. `stages.STAGES` lists them in
order; `config_check`, the rounds of `main` and the stage table of
`docs/architecture.md` (`stages.table()`, checked by a test) come from these
declarations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Stage:
  """name: as `config.stage` names it; run(config, workdir) -> summary dict;
  reads / writes: what it reads (workdir paths, config sections) and writes
  (in the workdir), as the docs table shows them; section: its config
  section ('' none) and `defaults` of that section's keys; problems(config)
  -> list of config problems, run by config_check when every section of
  `needs` is in the config and non-empty; in_rounds: repeated by rounds
  2..N (audit -> mine -> rectify); resolve(config, settings) -> settings:
  fills what the section leaves to other sections and refuses bad values
  (`settings` calls it)."""
  name: str
  run: Callable[[Any, str], dict]
  reads: str
  writes: str
  section: str = ""
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  problems: Callable[[Any], list[str]] | None = None
  needs: tuple[str, ...] = ()
  in_rounds: bool = False
  resolve: Callable[[Any, dict], dict] | None = None
  status: str = "built"

  def settings(self, config) -> dict:
    """The section's defaults updated with what the config gives, resolved."""
    s = dict(self.defaults, **dict(config.get(self.section, {}) if self.section else {}))
    return self.resolve(config, s) if self.resolve is not None else s

  def config_problems(self, config) -> list[str]:
    if self.problems is None or not all(config.get(k, None) for k in self.needs):
      return []
    return list(self.problems(config))

  def table_row(self) -> str:
    return f"| {self.name:8s} | {self.status:22s} | {self.reads} | {self.writes} |"


def unknown_keys(section: str, given, defaults) -> list[str]:
  """A problem naming the keys of `given` that `defaults` does not know."""
  bad = sorted(set(given) - set(defaults))
  return [f"{section}: unknown keys {bad}; known: {sorted(defaults)}"] if bad else []
