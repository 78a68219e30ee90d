"""The tiny CPU config: the whole AuditDM loop on a laptop.

Models use PaliGemma 2 (targets, references) and Gemma 3 (auditor)
architectures at tiny widths. Stages after `init` arrive with later issues.

  python -m auditdm_jax.main --config=configs/tiny.py --workdir=/tmp/auditdm_tiny
"""

import ml_collections


def _model(role, preset, **kw):
  return ml_collections.ConfigDict(dict(role=role, preset=preset, checkpoint="",
                                        dtype="", param_dtype="", **kw))


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.stage = "all"
  c.seed = 0
  c.workdir = "workdir/tiny"
  c.models = ml_collections.ConfigDict({
      "target_small": _model("target", "tiny-paligemma2"),
      "target_large": _model("target", "tiny-paligemma2"),
      "ref_a": _model("reference", "tiny-paligemma2"),
      "ref_b": _model("reference", "tiny-paligemma2"),
      "auditor": _model("auditor", "tiny-gemma3"),
  })
  return c
