r"""AuditDM against a Gemma 3 4B target with Gemma 3 12B / 27B references.

  python -m auditdm_jax.main --config=configs/audit_gemma3.py
  python -m auditdm_jax.tools.plan --config=configs/audit_gemma3.py

Arguments: ckpt_dir (local or gs://; empty: random init), workdir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

import ml_collections  # noqa: E402  pylint: disable=wrong-import-position


def get_config(arg=None):
  a = common.parse_arg(arg, {"ckpt_dir": "", "workdir": ""})

  def ckpt(name):
    return os.path.join(a["ckpt_dir"], name) if a["ckpt_dir"] else ""

  c = ml_collections.ConfigDict()
  c.stage = "all"
  c.seed = 0
  c.workdir = a["workdir"] or "workdir/audit_gemma3_4b"
  c.models = ml_collections.ConfigDict({
      "auditor": common.model("auditor", "gemma3-4b", ckpt("gemma3-4b-it"),
                              param_dtype="float32"),
      "target": common.model("target", "gemma3-4b", ckpt("gemma3-4b-it")),
      "ref_12b": common.model("reference", "gemma3-12b", ckpt("gemma3-12b-it")),
      "ref_27b": common.model("reference", "gemma3-27b", ckpt("gemma3-27b-it")),
  })
  common.mesh_and_rules(c)
  common.rl_and_plan(c, prompt_len=320, answer_prompt_len=320)
  return c
