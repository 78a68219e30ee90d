r"""AuditDM against a Gemma 3 4B target with Gemma 3 12B / 27B references.

  python -m auditdm_jax.main --config=configs/audit_gemma3.py
  python -m auditdm_jax.tools.plan --config=configs/audit_gemma3.py

Arguments: ckpt_dir (local or gs://; empty: random init), data_dir, slice,
workdir, runlocal; as in configs/audit_paligemma2.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

import ml_collections  # noqa: E402  pylint: disable=wrong-import-position


# The paper's Gemma 3 benchmarks as jsonl files under data_dir: (name, split,
# metric and prompt). Multiple choice shows the options as lettered lines and
# asks for the letter (lmms-eval's instruction); MMBench v1.1 is scored with
# CircularEval over its rotated copies (records sharing a `group`); POPE and
# MME are yes / no (MME's questions carry their own "Please answer yes or no.").
LETTER = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
SHORT = "{question}\nAnswer the question using a single word or phrase."
BENCHMARKS = (
    ("seedbench_img", "test", dict(metric="choice", prompt=LETTER)),
    ("mmtbench", "val", dict(metric="choice", prompt=LETTER)),
    ("mmbench_v11", "dev", dict(metric="circular", prompt=LETTER)),
    ("pope", "test", dict(metric="pope", prompt=SHORT)),
    ("realworldqa", "test", dict(metric="choice", prompt=LETTER)),
    ("mmstar", "val", dict(metric="choice", prompt=LETTER)),
    ("mmmu", "val", dict(metric="choice", prompt=LETTER)),
    ("mme", "test", dict(metric="mme", prompt="{question}")),
)


def get_config(arg=None):
  a = common.parse_arg(arg, {"ckpt_dir": "", "data_dir": "", "slice": "v5p-32",
                             "workdir": "", "runlocal": False, "editor": "none"})

  def ckpt(name):
    return common.join(a["ckpt_dir"], name)

  c = ml_collections.ConfigDict()
  c.stage = "all"
  c.seed = 0
  c.rounds = 1
  c.workdir = a["workdir"] or "workdir/audit_gemma3_4b"
  c.models = ml_collections.ConfigDict({
      "auditor": common.model("auditor", "gemma3-4b", ckpt("gemma3-4b-it"),
                              param_dtype="float32"),
      "target": common.model("target", "gemma3-4b", ckpt("gemma3-4b-it")),
      "ref_12b": common.model("reference", "gemma3-12b", ckpt("gemma3-12b-it")),
      "ref_27b": common.model("reference", "gemma3-27b", ckpt("gemma3-27b-it")),
  })
  common.data_section(c, a["data_dir"], seeds=("vqav2", "train"), benchmarks=BENCHMARKS,
                      rectify_train=("vqav2", "train"))
  common.mesh_and_rules(c, a["slice"])
  common.audit_sections(c, prompt_len=320, answer_prompt_len=320)
  if a["editor"] == "flux":
    common.flux_editor(c, a["ckpt_dir"])
  elif a["editor"] != "none":
    raise ValueError(f"editor must be none or flux, got {a['editor']!r}")
  if a["runlocal"]:
    common.runlocal(c, answerer="tiny-gemma3")
  return c
