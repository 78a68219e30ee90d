r"""AuditDM against a PaliGemma 2 target on TPU.

  python -m auditdm_jax.main --config=configs/audit_paligemma2.py:size=3b,res=448
  python -m auditdm_jax.tools.plan --config=configs/audit_paligemma2.py

Arguments (comma separated key=value): size (3b | 10b | 28b), res (224 | 448 |
896), ckpt_dir (where the checkpoints live, local or gs://; empty: random
init from the presets), workdir.

Auditor: Gemma 3 4B (trained with GRPO, float32 master weights). References:
the two other PaliGemma 2 sizes at the same resolution (10B and 28B for a 3B
target). Seed images, benchmarks and launch settings arrive with issues 5-7.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

import ml_collections  # noqa: E402  pylint: disable=wrong-import-position

SIZES = ("3b", "10b", "28b")
CHECKPOINTS = {  # big_vision release names
    "3b": "paligemma2-3b-pt-{res}.npz", "10b": "paligemma2-10b-pt-{res}.npz",
    "28b": "paligemma2-28b-pt-{res}.npz",
}


def get_config(arg=None):
  a = common.parse_arg(arg, {"size": "3b", "res": 448, "ckpt_dir": "", "workdir": ""})
  if a["size"] not in SIZES:
    raise ValueError(f"size must be one of {SIZES}, got {a['size']!r}")
  size, res = a["size"], a["res"]

  def ckpt(name):
    return os.path.join(a["ckpt_dir"], name) if a["ckpt_dir"] else ""

  c = ml_collections.ConfigDict()
  c.stage = "all"
  c.seed = 0
  c.workdir = a["workdir"] or f"workdir/audit_paligemma2_{size}_{res}"
  refs = [s for s in SIZES if s != size]
  c.models = ml_collections.ConfigDict({
      "auditor": common.model("auditor", "gemma3-4b", ckpt("gemma3-4b-it"),
                              param_dtype="float32"),
      "target": common.model("target", f"paligemma2-{size}-{res}",
                             ckpt(CHECKPOINTS[size].format(res=res))),
      **{f"ref_{s}": common.model("reference", f"paligemma2-{s}-{res}",
                                  ckpt(CHECKPOINTS[s].format(res=res))) for s in refs},
  })
  common.mesh_and_rules(c)
  # Auditor prompt: ~256 soft image tokens + instruction; answers: the
  # target's image tokens ((res/14)^2) + question.
  common.rl_and_plan(c, prompt_len=320, answer_prompt_len=(res // 14) ** 2 + 48)
  return c
