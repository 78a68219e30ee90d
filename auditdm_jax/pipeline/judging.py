"""The judge of `audit.reward.mode = "judge"`, as the audit and mine stages build it.

The judge is any model of the run (`audit.reward.judge`, default the first
reference). It scores "do these two answers mean the same?" through the
answerer's own Sampler when it also answers (no second copy of its
weights), else through a Sampler of its own, placed like the others
(`placement.sampler`), in fixed batches of `audit.reward.judge_batch` pairs.
"""

from __future__ import annotations

from auditdm_jax.audit import reward as reward_lib
from auditdm_jax.pipeline import layout, placement


def problems(config, rcfg: reward_lib.RewardConfig) -> list[str]:
  """Judge mode: the judge must be one of the run's models ([] otherwise)."""
  if rcfg.mode != "judge":
    return []
  refs = layout.roles(config, "reference")
  if not rcfg.judge and not refs:
    return ["audit.reward.judge: judge mode needs a judge; none is named and the config "
            "has no reference (the default judge)"]
  name = reward_lib.judge_name(rcfg, refs)
  if name not in config.models:
    return [f"audit.reward.judge: {name!r} is not a model of this config; the judge must "
            f"be one of the run's models {sorted(config.models)}"]
  return []


def build(config, workdir: str, rcfg: reward_lib.RewardConfig, samplers, loaded, mesh,
          length_bucket: int):
  """(the `reward.ModelJudge`, its parameters), or (None, None) in exact mode.

  samplers: {name: Sampler} the stage already placed (the answerers); loaded:
  {name: VLM} it already loaded. A judge in neither is loaded from
  `<workdir>/models/<judge>`."""
  if rcfg.mode != "judge":
    return None, None
  name = reward_lib.judge_name(rcfg, layout.roles(config, "reference"))
  model = loaded.get(name)
  if model is None:
    model = layout.load_model(workdir, name, "judge", "run the init stage first")
  scorer = samplers.get(name)
  if scorer is None:
    scorer = placement.sampler(config, name, model, mesh, length_bucket=length_bucket)
  return reward_lib.ModelJudge(scorer, name, rcfg.judge_batch), model.params
