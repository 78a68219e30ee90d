"""The one home of the defaults of config sections that more than one stage
reads (the audit section: the audit, mine and eval stages, the evaluation and
the planner). A stage declares its section's defaults on its `Stage`
(`pipeline/spec.py`); the readers of a section another stage owns read it
through `settings(config, section)`, which gives the same dict as the owning
stage's `STAGE.settings(config)`, so an override has one spelling and reaches
every reader.

Keys without a default (the audit's `steps`, `mixture`, ...) are required:
the owning stage's config problems name them when they are missing.
"""

from __future__ import annotations

# The audit section's optional keys (configs/common.py and configs/tiny.py
# set the required ones; `grpo`, `optim` and `reward` are read by
# pipeline/recipes.audit_configs with their dataclasses' defaults).
AUDIT = dict(
    answer_tokens=4,      # greedy answer length of the target and references
    answer_bucket=32,     # one prompt-length bucket for every question
    eval_batch=64,        # rows per held-out search call
    log_every=10, log_examples=2,
    seed_count=64,        # held-out seeds of the per-seed search success
    seed_budget=8,        # probes per seed (the paper's B)
    progress=None,        # the progress bar (None: when stdout is a terminal)
    diversity=None,       # audit.diversity (audit/diversity.DiversityConfig)
    editor="",            # the image editor (pipeline/editing.get_editor; "flux": FLUX)
    target="",            # "" = the first target
)

# The eval section.
EVAL = dict(
    auditor_samples=96,   # scene world: auditor outputs checked for validity
    batch=64,             # named benchmarks: rows per prediction call
    max_examples=0,       # named benchmarks: records per benchmark (0 = all)
)

DEFAULTS = {"audit": AUDIT, "eval": EVAL}


def settings(config, section: str) -> dict:
  """The section's defaults updated with what the config gives."""
  if section not in DEFAULTS:
    raise KeyError(f"no shared defaults for config section {section!r}; known: {sorted(DEFAULTS)}")
  return dict(DEFAULTS[section], **dict(config.get(section, {}) or {}))
