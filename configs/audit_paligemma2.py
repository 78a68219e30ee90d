r"""AuditDM against a PaliGemma 2 target on TPU.

  python -m auditdm_jax.main --config=configs/audit_paligemma2.py:size=3b,res=448
  python -m auditdm_jax.tools.plan --config=configs/audit_paligemma2.py

Arguments (comma separated key=value):
  size      3b | 10b | 28b (the target; the other two sizes are the references)
  res       224 | 448 | 896
  ckpt_dir  where the checkpoints live, local or gs:// (big_vision release
            names, e.g. paligemma2-3b-pt-448.npz, and gemma3-4b-it/); empty:
            random init from the presets
  data_dir  local or gs:// root of the jsonl datasets: <data_dir>/<name>/<split>.jsonl
            with big_vision keys {"image", "prefix", "suffix"} and the fields
            each benchmark's metric needs (data/named.py: every VQAv2 answer,
            AI2D's options, RefCOCO's box, COCO's captions and image ids);
            any dataset may be swapped for a TFDS one with --config.data...
  slice     the TPU slice (configs/common.py SLICES: mesh, gradient accumulation)
  workdir   outputs (a path every host sees: a gcsfuse mount on a pod)
  runlocal  true: tiny presets and a few steps on CPU, with checkpoints and data
            written for them (tests/test_real_config.py)
  editor    none: the auditor writes questions only; flux: FLUX.1 Kontext dev
            edits and FLUX.1 dev regenerates (diffusers pipeline directories
            <ckpt_dir>/FLUX.1-Kontext-dev and <ckpt_dir>/FLUX.1-dev), and the
            mixture adds the edit and caption pairings (configs/common.py)

Auditor: Gemma 3 4B (trained with GRPO, float32 master weights). References:
the two other PaliGemma 2 sizes at the same resolution (10B and 28B for a 3B
target). Real images; by default no diffusion editor: the auditor writes
probing questions (audit.editor='none'); `editor=flux` adds the paper's edit
and regeneration routes through FLUX (auditdm_jax/diffusion).
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


# The paper's PaliGemma 2 benchmarks: (name, split, metric and prompt), each a
# jsonl under data_dir (data/named.py documents the fields each metric needs).
# Prompts follow PaliGemma's task prefixes (big_vision's paligemma transfer
# configs): "answer en {question}" for VQA (VQAv2, GQA, OK-VQA; big_vision
# feeds DocVQA's and ChartQA's questions bare to its fine-tuned transfers, our
# pt checkpoints get the pretraining prefix), AI2D as "answer en <question>
# choose from: <options>" (here as lettered lines), "detect <expression>" for
# RefCOCO (answered as four <locNNNN> tokens, y1 x1 y2 x2), "caption en" for
# COCO captions.
ANSWER = "answer en {question}"
BENCHMARKS = (
    ("vqav2", "val", dict(metric="vqa", prompt=ANSWER)),
    ("gqa", "testdev", dict(metric="exact", prompt=ANSWER)),
    ("okvqa", "val", dict(metric="vqa", prompt=ANSWER)),
    ("ai2d", "test", dict(metric="choice", prompt=ANSWER + " choose from:\n{options}")),
    ("docvqa", "val", dict(metric="anls", prompt=ANSWER)),
    ("chartqa", "test", dict(metric="relaxed", prompt=ANSWER)),
    ("refcoco", "val", dict(metric="refcoco", prompt="detect {question}")),
    ("coco_captions", "test", dict(metric="cider", prompt="caption en", max_new_tokens=32)),
)


def get_config(arg=None):
  a = common.parse_arg(arg, {"size": "3b", "res": 448, "ckpt_dir": "", "data_dir": "",
                             "slice": "v5p-32", "workdir": "", "runlocal": False, "editor": "none"})
  if a["size"] not in SIZES:
    raise ValueError(f"size must be one of {SIZES}, got {a['size']!r}")
  size, res = a["size"], a["res"]

  def ckpt(name):
    return common.join(a["ckpt_dir"], name)

  c = ml_collections.ConfigDict()
  c.stage = "all"
  c.seed = 0
  c.rounds = 1
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
  # Seeds: VQAv2 train images (the paper audits on 20K VQAv2 seeds); benchmarks:
  # the paper's eight, each scored with its own metric (BENCHMARKS); augment:
  # VQAv2 train.
  common.data_section(c, a["data_dir"], seeds=("vqav2", "train"), benchmarks=BENCHMARKS,
                      rectify_train=("vqav2", "train"))
  common.mesh_and_rules(c, a["slice"])
  # Auditor prompt: 256 soft image tokens + instruction; answers: the
  # target's image tokens ((res/14)^2) + question.
  common.audit_sections(c, prompt_len=320, answer_prompt_len=(res // 14) ** 2 + 48)
  if a["editor"] == "flux":
    common.flux_editor(c, a["ckpt_dir"])
  elif a["editor"] != "none":
    raise ValueError(f"editor must be none or flux, got {a['editor']!r}")
  if a["runlocal"]:
    common.runlocal(c)
  return c
