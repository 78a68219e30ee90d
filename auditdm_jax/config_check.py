"""Validation of pipeline configs (configs/*.py) before any work starts.

A malformed config fails here with every problem named, not deep inside a
stage after minutes of compilation. With `check_inputs` (what `main` does),
every checkpoint (local or gs://) and every named dataset must also exist;
the memory planner checks the structure only.
"""

from __future__ import annotations


from auditdm_jax import models, sharding, stages
from auditdm_jax.data import named
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.pipeline import editing
from auditdm_jax.pipeline.layout import ROLES
from auditdm_jax.pipeline.spec import unknown_keys
from auditdm_jax.utils import fileio


class ConfigError(ValueError):
  pass


def check(config, check_inputs: bool = True) -> None:
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
      problems += _model_problems(config, name, spec, check_inputs)
  problems += placement_problems(config)
  rounds = config.get("rounds", 1)
  if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
    problems.append(f"rounds must be an int >= 1, got {rounds!r}")
  if "data" in config:
    problems += data_problems(config, check_inputs)
  if check_inputs:   # the FLUX editor's checkpoints (its settings: the audit stage's check)
    problems += [p for p in editing.problems(config, check_inputs=True)
                 if p not in editing.problems(config, check_inputs=False)]
  for stage in stages.STAGES:        # each stage's own problems (its declaration)
    problems += stage.config_problems(config)
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _model_problems(config, name: str, spec, check_inputs: bool) -> list[str]:
  """The problems of one entry of `models`."""
  problems = []
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
  if ckpt and check_inputs:
    # Checked here, before any model is built or compiled (gs:// too).
    try:
      if not fileio.exists(str(ckpt)):
        problems.append(f"{where}.checkpoint: {ckpt!r} does not exist")
    except (RuntimeError, OSError) as e:
      problems.append(f"{where}.checkpoint: {e}")
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
  steps = spec.get("finetune_steps", None)
  if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                            or steps < 0):
    problems.append(f"{where}.finetune_steps must be an int >= 0 (0: pretrain.finetune."
                    f"steps), got {steps!r}")
  elif steps and role not in ("target", "reference"):
    problems.append(f"{where}.finetune_steps: only targets and references are "
                    f"fine-tuned from the base (role is {role!r})")
  rate = spec.get("judge_rate", None)
  if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                           or not 0 <= rate < 1):
    problems.append(f"{where}.judge_rate must be a number in [0, 1), got {rate!r}")
  elif rate and role not in ("target", "reference"):
    problems.append(f"{where}.judge_rate: only targets and references are fine-tuned "
                    f"from the base, so only they learn to judge (role is {role!r})")
  for key in ("dtype", "param_dtype"):
    value = spec.get(key, None)
    if value not in (None, "", "float32", "bfloat16", "float16"):
      problems.append(f"{where}.{key} is {value!r}; use float32, bfloat16 or float16")
  return problems


def data_problems(config, check_inputs: bool) -> list[str]:
  """The `data` section: named datasets (data/named.py) for seed images,
  benchmarks and the labelled data of `rectify`'s augment strategy."""
  d = config.data
  problems = unknown_keys("data", dict(d), {"seed_images": 0, "benchmarks": 0,
                                           "rectify_train": 0})
  if "seed_images" in d and d.seed_images:
    problems += named.problems(d.seed_images, "data.seed_images", check_exists=check_inputs)
  for name, spec in dict(d.get("benchmarks", {}) or {}).items():
    problems += named.problems(spec, f"data.benchmarks.{name}", check_exists=check_inputs)
  if d.get("rectify_train", None):
    problems += named.problems(d.rectify_train, "data.rectify_train",
                               check_exists=check_inputs)
  return problems


def placement_problems(config) -> list[str]:
  """`mesh` ({axis: size}, axes data / fsdp / model, one may be -1) and the
  partition rules, the config's and each model's (`pipeline/placement.py`)."""
  problems = []
  mesh = config.get("mesh", None)
  if mesh:
    items = dict(mesh).items()
    bad = [(n, v) for n, v in items if n not in ("data", "fsdp", "model")
           or isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1)]
    if bad or sum(v == -1 for _, v in items) > 1:
      problems.append(f"mesh must map data / fsdp / model to sizes >= 1 (one may be -1), "
                      f"got {dict(mesh)!r}")
  where = [("partition_rules", config.get("partition_rules", None))]
  where += [(f"models.{n}.partition_rules", s.get("partition_rules", None))
            for n, s in (config.get("models", None) or {}).items()]
  for name, rules in where:
    if rules:
      try:
        sharding.rules_from_config(rules)
      except (ValueError, TypeError) as e:
        problems.append(f"{name}: {e}")
  return problems
