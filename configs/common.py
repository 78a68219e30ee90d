"""Pieces shared by the real-scale configs (imported by path from configs/)."""

import ml_collections


def parse_arg(arg, defaults):
  """'size=3b,res=448' -> dict over `defaults` (unknown keys are an error)."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    out[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return out


def model(role, preset, checkpoint="", param_dtype="bfloat16", dtype="bfloat16"):
  return ml_collections.ConfigDict(dict(role=role, preset=preset, checkpoint=checkpoint,
                                        dtype=dtype, param_dtype=param_dtype))


def mesh_and_rules(c, fsdp=-1, model_axis=1):
  # Devices: data x fsdp x model. The default is pure FSDP; raise `model` for
  # tensor parallelism over heads and MLP units on large slices.
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": fsdp, "model": model_axis})
  # Regex partition rules over parameter paths (see auditdm_jax/sharding.py);
  # empty means sharding.DEFAULT_RULES: TP over heads / MLP / vocab rows, the
  # stacked layer axis never sharded, FSDP on the largest remaining dimension.
  c.partition_rules = ()


def rl_and_plan(c, prompt_len, answer_prompt_len):
  # GRPO, real-scale schedule (PAPER.md): AdamW lr 3e-6, 10% warm-up, cosine
  # to 1e-6, 1K steps, global batch 256; K=8, epsilon 0.2, beta 0.04.
  c.rl = ml_collections.ConfigDict(dict(
      steps=1000, global_batch=256, num_samples=8, lr=3e-6, final_lr=1e-6,
      warmup_fraction=0.1, clip_epsilon=0.2, kl_beta=0.04, temperature=1.0,
      max_new_tokens=64, train_vision=False))
  c.answers = ml_collections.ConfigDict(dict(max_new_tokens=16, temperature=0.0))
  # Workload the memory planner (python -m auditdm_jax.tools.plan) sizes.
  c.plan = ml_collections.ConfigDict(dict(
      slices=("v5e-16", "v5p-32", "v5p-64", "v6e-64"),
      auditor_prompt_len=prompt_len, answer_prompt_len=answer_prompt_len,
      kv_cache_dtype="bfloat16", activation_dtype="bfloat16", hbm_headroom=0.9))
