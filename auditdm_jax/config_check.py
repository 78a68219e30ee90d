"""Validation of pipeline configs (configs/*.py) before any work starts.

A malformed config fails here with every problem named, not deep inside a
stage after minutes of compilation. With `check_inputs` (what `main` does),
every checkpoint (local or gs://) and every named dataset must also exist;
the memory planner checks the structure only.
"""

from __future__ import annotations


from auditdm_jax import models, stages
from auditdm_jax.data import named
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.stages.init_models import ROLES
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
      for key in ("dtype", "param_dtype"):
        value = spec.get(key, None)
        if value not in (None, "", "float32", "bfloat16", "float16"):
          problems.append(f"{where}.{key} is {value!r}; use float32, bfloat16 or float16")
  problems += pretrain_problems(config)
  rounds = config.get("rounds", 1)
  if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
    problems.append(f"rounds must be an int >= 1, got {rounds!r}")
  if "data" in config:
    problems += data_problems(config, check_inputs)
  if "audit" in config and specs:
    problems += audit_problems(config)
    problems += mine_problems(config)
    problems += rectify_problems(config)
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def pretrain_problems(config) -> list[str]:
  """The pretrain recipes' curriculum skills and phrase-loss weights."""
  problems: list[str] = []
  pc = config.get("pretrain", None)
  if not pc:
    return problems
  from auditdm_jax.scenes.questions import SKILLS  # pylint: disable=import-outside-toplevel
  for name in ("base_first", "base", "base_tune", "finetune"):
    rc = pc.get(name, None)
    if not rc:
      continue
    w = rc.get("phrase_aux", 0.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
      problems.append(f"pretrain.{name}.phrase_aux must be a number >= 0, got {w!r}")
    ps = rc.get("phrase_skills", ())
    if isinstance(ps, str) or any(k not in SKILLS for k in ps):
      problems.append(f"pretrain.{name}.phrase_skills must be a list of {SKILLS}, got {ps!r}")
  aud = pc.get("auditor", None)
  if aud:
    from auditdm_jax.audit.rollout import PAIRINGS  # pylint: disable=import-outside-toplevel
    from auditdm_jax.scenes.text import AUDITOR_TASKS  # pylint: disable=import-outside-toplevel
    known = tuple(AUDITOR_TASKS)   # as train.tasks.ROUTES
    routes = aud.get("routes", known)
    if isinstance(routes, str) or not routes or any(r not in known for r in routes):
      problems.append(f"pretrain.auditor.routes must be a non-empty list of {known}, "
                      f"got {routes!r}")
    elif "audit" in config:
      used = {t for p, w in dict(config.audit.get("mixture", {})).items() if w
              for t in PAIRINGS.get(p, ())}
      missing = sorted(used - set(routes))
      if missing:
        problems.append(f"audit.mixture asks the auditor for {missing} texts, but "
                        f"pretrain.auditor.routes {tuple(routes)} does not warm-start them")
  first = pc.get("base_first", None)
  if first and int(first.get("steps", 0) or 0) > 0:
    skills = first.get("skills", ())
    if isinstance(skills, str) or not skills or any(k not in SKILLS for k in skills):
      problems.append(f"pretrain.base_first.skills must be a non-empty list of {SKILLS}, "
                      f"got {skills!r}")
  return problems


def data_problems(config, check_inputs: bool) -> list[str]:
  """The `data` section: named datasets (data/named.py) for seed images,
  benchmarks and the labelled data of `rectify`'s augment strategy."""
  d = config.data
  problems = _known_keys("data", dict(d), {"seed_images": 0, "benchmarks": 0,
                                           "rectify_train": 0})
  if "seed_images" in d and d.seed_images:
    problems += named.problems(d.seed_images, "data.seed_images", check_exists=check_inputs)
  for name, spec in dict(d.get("benchmarks", {}) or {}).items():
    problems += named.problems(spec, f"data.benchmarks.{name}", check_exists=check_inputs)
  if d.get("rectify_train", None):
    problems += named.problems(d.rectify_train, "data.rectify_train",
                               check_exists=check_inputs)
  return problems


def audit_problems(config) -> list[str]:
  """Problems of the `audit` section (every one, not just the first)."""
  # Imported here: the audit stage pulls in the samplers and trainers.
  from auditdm_jax.audit import rollout  # pylint: disable=import-outside-toplevel
  from auditdm_jax.stages import audit  # pylint: disable=import-outside-toplevel
  problems = []
  a = config.audit
  for key in ("steps", "prompts_per_step", "eval_budget", "max_new_tokens", "seq_len",
              "checkpoint_every"):
    v = a.get(key, None)
    if not isinstance(v, int) or v < 1:
      problems.append(f"audit.{key} must be an int >= 1, got {v!r}")
  try:
    audit.audit_target(config)
  except ValueError as e:
    problems.append(str(e))
  try:
    rollout.check_mixture(dict(a.get("mixture", {})))
  except (ValueError, TypeError) as e:
    problems.append(f"audit.mixture: {e}")
  try:
    _, _, rcfg = audit.configs_from(config)
    if rcfg.mode != "exact":
      problems.append("audit.reward: the audit stage uses the exact reward only (mode "
                      "'exact'); the judge mode is not wired in yet")
  except (ValueError, TypeError, AttributeError, KeyError) as e:
    problems.append(f"audit: {e}")
  try:
    from auditdm_jax.audit import editor  # pylint: disable=import-outside-toplevel
    editor.get_editor(a.get("editor", ""))
    allowed = editor.PAIRINGS.get(a.get("editor", ""), None)
    for section in ("audit", "mine"):
      mix = dict(config.get(section, {}).get("mixture", {}) or {})
      bad = sorted(k for k, v in mix.items() if v and allowed is not None and k not in allowed)
      if bad:
        problems.append(f"{section}.mixture: pairings {bad} need an image editor; editor "
                        f"{a.get('editor', '')!r} allows only {list(allowed)}")
  except ValueError as e:
    problems.append(f"audit.editor: {e}")
  seeds = config.get("world", {}).get("seed_images_size", None)
  budget = a.get("eval_budget", None)
  if isinstance(seeds, int) and isinstance(budget, int) and budget >= seeds:
    problems.append(f"audit.eval_budget ({budget}) must be smaller than "
                    f"world.seed_images_size ({seeds}): the rest trains the auditor")
  return problems


def _known_keys(section: str, given, defaults: dict) -> list[str]:
  bad = sorted(set(given) - set(defaults))
  return [f"{section}: unknown keys {bad}; known: {sorted(defaults)}"] if bad else []


def mine_problems(config) -> list[str]:
  from auditdm_jax.audit import rollout  # pylint: disable=import-outside-toplevel
  from auditdm_jax.stages import mine  # pylint: disable=import-outside-toplevel
  given = dict(config.get("mine", {}))
  problems = _known_keys("mine", given, mine.DEFAULTS)
  m = mine.settings(config)
  for key in ("samples_per_seed", "chunk_seeds", "top_k", "min_probes"):
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      problems.append(f"mine.{key} must be an int >= 1, got {v!r}")
  if isinstance(m["seeds"], bool) or not isinstance(m["seeds"], int) or m["seeds"] < 0:
    problems.append(f"mine.seeds must be an int >= 0 (0: every seed image), got {m['seeds']!r}")
  for key in ("purity", "merge_rate"):
    v = m[key]
    if not isinstance(v, (int, float)) or not 0 < v <= 1:
      problems.append(f"mine.{key} must be in (0, 1], got {v!r}")
  names = set(config.models) | {f"{n}_trained" for n, s in config.models.items()
                                if s.get("role", "") == "auditor"}
  bad = [a for a in m["auditors"] if a not in names]
  if bad:
    problems.append(f"mine.auditors: {bad} are not auditor checkpoints of this config "
                    f"(known: {sorted(names)})")
  try:
    rollout.check_mixture(dict(m["mixture"]))
  except (ValueError, TypeError) as e:
    problems.append(f"mine.mixture: {e}")
  return problems


def rectify_problems(config) -> list[str]:
  from auditdm_jax.stages import rectify  # pylint: disable=import-outside-toplevel
  given = dict(config.get("rectify", {}))
  problems = _known_keys("rectify", given, rectify.DEFAULTS)
  try:
    r = rectify.settings(config)
  except ValueError as e:
    return problems + [str(e)]
  t = r["target"]
  if t and (t not in config.models or config.models[t].get("role", "") != "target"):
    problems.append(f"rectify.target {t!r} is not a model with role 'target'")
  for key in ("steps", "batch", "seq_len", "checkpoint_every", "log_every"):
    v = r[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      problems.append(f"rectify.{key} must be an int >= 1, got {v!r}")
  if not isinstance(r["lr"], (int, float)) or not r["lr"] > 0:
    problems.append(f"rectify.lr must be > 0, got {r['lr']!r}")
  return problems
