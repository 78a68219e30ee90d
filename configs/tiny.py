"""The tiny CPU config: the whole AuditDM loop on a laptop, in the scene world.

Models use PaliGemma 2 (targets, references) and Gemma 3 (auditor)
architectures at tiny widths (`scene-*` presets, models/presets.py). The two
targets carry planted capability gaps (`gaps`, grammar in scenes/gaps.py);
the references are healthy. Stages after `eval` arrive with later issues.

  python -m auditdm_jax.main --config=configs/tiny.py --workdir=/tmp/auditdm_tiny
"""

import ml_collections


def _model(role, preset, gaps=(), **kw):
  return ml_collections.ConfigDict(dict(role=role, preset=preset, checkpoint="",
                                        dtype="", param_dtype="", gaps=tuple(gaps),
                                        gap_mode="corrupt", **kw))


def get_config(arg=None):
  """arg "smoke": the same pipeline at toy sizes (seconds of training, for CI
  and tests of the wiring; its models learn nothing)."""
  if arg not in (None, "", "smoke"):
    raise ValueError(f"configs/tiny.py takes no argument or 'smoke', got {arg!r}")
  c = ml_collections.ConfigDict()
  c.stage = "all"
  c.seed = 0
  c.workdir = "workdir/tiny"
  c.models = ml_collections.ConfigDict({
      # The paper's comparison of a small and a large target, in miniature:
      # the small one misses large counts and purple, the large one
      # hallucinates absent objects and confuses left and right.
      "target_small": _model("target", "scene-paligemma2-small",
                             gaps=("counting:n>=4", "colour:purple")),
      "target_large": _model("target", "scene-paligemma2-large",
                             gaps=("existence:no", "spatial:left")),
      "ref_a": _model("reference", "scene-paligemma2-large"),
      "ref_b": _model("reference", "scene-paligemma2-large"),
      "auditor": _model("auditor", "scene-gemma3"),
  })
  # The scene world's data (TFDS array_record, built by `pretrain`).
  c.world = ml_collections.ConfigDict(dict(
      data_dir="",              # "" = <workdir>/data
      train_size=60_000, benchmark_size=2_000, seed_images_size=1_000,
      build_workers=1, loader_workers=0))
  c.pretrain = ml_collections.ConfigDict(dict(
      seq_len=24,
      vision=dict(steps=300, batch=256, lr=3e-3),
      base=dict(preset="scene-paligemma2-large", steps=4000, batch=32, lr=5e-3,
                warmup=100, end_lr=2e-4, checkpoint_every=500, log_every=250),
      finetune=dict(steps=250, batch=32, lr=1e-3, warmup=20, end_lr=1e-4,
                    checkpoint_every=150, log_every=100),
      auditor=dict(steps=400, batch=32, lr=3e-3, warmup=50, end_lr=1e-4, seq_len=112,
                   checkpoint_every=250, log_every=100),
  ))
  c.eval = ml_collections.ConfigDict(dict(auditor_samples=96))
  if arg == "smoke":
    _smoke(c)
  return c


def _smoke(c):
  c.workdir = "workdir/tiny_smoke"
  c.world.update(dict(train_size=256, benchmark_size=64, seed_images_size=16))
  p = c.pretrain
  p.vision.update(dict(steps=3, batch=16))
  for r, batch in ((p.base, 8), (p.finetune, 8), (p.auditor, 4)):
    r.update(dict(steps=2, batch=batch, warmup=1, checkpoint_every=2, log_every=2,
                  compiler_options={"xla_backend_optimization_level": 0}))
  c.eval.auditor_samples = 8
