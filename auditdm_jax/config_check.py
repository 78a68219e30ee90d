"""Validation of pipeline configs (configs/*.py) before any work starts.

A malformed config fails here with every problem named, not deep inside a
stage after minutes of compilation.
"""

from __future__ import annotations

from auditdm_jax import models, stages
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.stages.init_models import ROLES


class ConfigError(ValueError):
  pass


def check(config) -> None:
  problems = []
  stage = config.get("stage", None)
  if stage not in stages.ORDER + ("all",):
    problems.append(f"stage is {stage!r}; expected one of {stages.ORDER + ('all',)}")
  if not isinstance(config.get("seed", None), int):
    problems.append(f"seed must be an int, got {config.get('seed', None)!r}")
  specs = config.get("models", None)
  if not specs:
    problems.append("models is empty; name at least one model")
  else:
    for name, spec in specs.items():
      where = f"models.{name}"
      role = spec.get("role", None)
      if role not in ROLES:
        problems.append(f"{where}.role is {role!r}; expected one of {ROLES}")
      ckpt, preset = spec.get("checkpoint", None), spec.get("preset", None)
      if not ckpt and not preset:
        problems.append(f"{where}: give a 'checkpoint', a 'preset', or both (the "
                        "preset is then the architecture the checkpoint loads into)")
      elif preset:
        try:
          models.get_preset(preset)
        except ValueError as e:
          problems.append(f"{where}.preset: {e}")
      gaps = spec.get("gaps", ())
      if isinstance(gaps, str):
        problems.append(f"{where}.gaps must be a list of 'SKILL:FILTER' specs, got the "
                        f"string {gaps!r}")
      elif gaps:
        if role != "target":
          problems.append(f"{where}.gaps: only targets carry planted gaps (role is {role!r})")
        try:
          gaps_lib.parse_gaps(list(gaps))
        except ValueError as e:
          problems.append(f"{where}.gaps: {e}")
      mode = spec.get("gap_mode", "corrupt")
      if mode not in gaps_lib.MODES:
        problems.append(f"{where}.gap_mode is {mode!r}; expected one of {gaps_lib.MODES}")
      if preset and str(preset).startswith("scene-") and not ckpt:
        for section in ("world", "pretrain"):
          if section not in config:
            problems.append(f"{where} uses the scene preset {preset!r}, which is trained by "
                            f"the pretrain stage, but the config has no {section!r} section")
      for key in ("dtype", "param_dtype"):
        value = spec.get(key, None)
        if value not in (None, "", "float32", "bfloat16", "float16"):
          problems.append(f"{where}.{key} is {value!r}; use float32, bfloat16 or float16")
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
