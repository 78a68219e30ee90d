"""Run by tests/test_placement.py in a subprocess with 8 host CPU devices: the
smoke config on an fsdp=2 x model=4 mesh with a per-model partition rule for the target
and the auditor; runs the init, pretrain, eval, audit and rectify stages and records the
parameter sharding of the token embedding in every sampler and trainer the
stages build, keyed by model name (samplers) or model role (trainers). Prints
a JSON summary."""

import json
import sys

import numpy as np
from absl import flags

from auditdm_jax import sharding
from auditdm_jax.data import exemplars_tfds as store
from auditdm_jax.models import vlm
from auditdm_jax.pipeline import layout, placement
from auditdm_jax.stages import audit, evaluate, init_models, pretrain, rectify
from auditdm_jax.train import trainer as trainer_lib
from configs import tiny

EMBED = "llm/embedder/input_embedding"


def embed_spec(shardings) -> str:
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in __import__("jax").tree_util.tree_leaves_with_path(shardings)}
  return str(flat[EMBED].spec)


def main(workdir: str):
  flags.FLAGS.mark_as_parsed()
  config = tiny.get_config("smoke")
  config.mesh = {"data": 1, "fsdp": 2, "model": 4}
  target = layout.audit_target(config)
  aud = layout.roles(config, "auditor")[0]
  # A rule that places the embedding differently from the defaults on this mesh.
  cfg = init_models.build_model(config.models[target], 0).config
  shape = vlm.abstract_params(cfg)["llm"]["embedder"]["input_embedding"].shape
  mesh_shape = dict(config.mesh)
  default = sharding.spec_for_param(EMBED, shape, mesh_shape, sharding.rules_from_config(None))
  rule = None
  for cand in (("model", None), (None, "model"), (None, None), ("fsdp", None), (None, "fsdp")):
    r = ((r"(^|/)embedder/input_embedding$", cand), (r".*", ()))
    spec = sharding.spec_for_param(EMBED, shape, mesh_shape, r)
    if spec != default:
      rule = [[r"(^|/)embedder/input_embedding$", list(cand)], [".*", []]]
      break
  assert rule is not None, (shape, default)
  for name in (target, aud):
    config.models[name].partition_rules = rule
  config.audit.steps = 1
  config.rectify.update(dict(steps=1, checkpoint_every=1, log_every=1))

  seen = {"samplers": {}, "trainers": [], "phase": "init"}
  real_sampler = placement.sampler

  def spy_sampler(config_, name, model, mesh_=None, **kw):
    s = real_sampler(config_, name, model, mesh_, **kw)
    seen["samplers"].setdefault(f"{seen['phase']}:{name}", set()).add(
        embed_spec(s.param_shardings))
    return s
  placement.sampler = spy_sampler
  real_init = trainer_lib.Trainer.__init__

  def spy_init(self, cfg_, tcfg, mesh=None):
    real_init(self, cfg_, tcfg, mesh)
    seen["trainers"].append({"kind": type(self).__name__, "phase": seen["phase"],
                             "devices": self.mesh.devices.size,
                             "embed": embed_spec(self.param_shardings)})
  trainer_lib.Trainer.__init__ = spy_init

  init_models.run(config, workdir)
  seen["phase"] = "pretrain"
  pretrain.run(config, workdir)
  pretrain_trainers, seen["trainers"] = seen["trainers"], []
  seen["phase"] = "eval"
  evaluate.run(config, workdir)
  seen["phase"] = "audit"
  audit.run(config, workdir)
  # A one-exemplar store of failures of the target, so rectify trains it.
  chunks, tfds_dir = layout.store_paths(workdir)
  src = layout.scene_source(config, workdir, "train")
  recs = []
  for i in range(8):
    r = src[i]
    img = np.asarray(r["image"])
    recs.append({"id": f"id{i:04d}", "pairing": "question", "route": "question",
                 "auditor_text": r["question"], "auditor_text2": "", "question": r["question"],
                 "pseudo_label": r["answer"], "answers": {target: "x"}, "failed": [target],
                 "skill": r["skill"], "factor": "", "category": r["skill"], "context": "",
                 "auditor": layout.trained_name(aud), "auditor_step": 1, "seed_index": i,
                 "seed_image": img, "image": img})
  store.write_chunk(store.chunk_path(chunks, layout.trained_name(aud), 0), recs)
  store.publish(chunks, tfds_dir)
  seen["phase"] = "rectify"
  out_r = rectify.run(config, workdir)
  print(json.dumps({"default": str(default), "rule": rule, "target": target, "auditor": aud,
                    "samplers": {k: sorted(v) for k, v in seen["samplers"].items()},
                    "trainers": seen["trainers"], "pretrain_trainers": pretrain_trainers,
                    "rectify_skipped": out_r.get("skipped")}))


if __name__ == "__main__":
  main(sys.argv[1])
