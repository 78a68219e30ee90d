"""Pieces shared by the real-scale configs (imported by path from configs/)."""

import ml_collections

# Per TPU slice: the device mesh (data x fsdp x model; -1 = the rest) and the
# gradient accumulation of the auditor's GRPO step (micro-batches per step;
# it lowers the training activations, not the 28B reference's sampling,
# which is what rules out slices smaller than these). Pure FSDP shards every
# model over all chips. Every entry is checked against the memory planner for
# both real configs (tests/test_plan.py); e.g.
#   python -m auditdm_jax.tools.plan --config=configs/audit_paligemma2.py:slice=v5e-32
# v5e-16 does not fit: 9.41 GiB resident + 9.28 GiB to sample the 28B
# reference > 14.4 GiB usable of 16.
SLICES = {
    "v5e-32": dict(mesh=dict(data=1, fsdp=-1, model=1), grad_accum=1),
    "v5e-64": dict(mesh=dict(data=1, fsdp=-1, model=1), grad_accum=1),
    "v5p-16": dict(mesh=dict(data=1, fsdp=-1, model=1), grad_accum=1),
    "v5p-32": dict(mesh=dict(data=1, fsdp=-1, model=1), grad_accum=1),
    "v5p-64": dict(mesh=dict(data=1, fsdp=-1, model=1), grad_accum=1),
    "v6e-16": dict(mesh=dict(data=1, fsdp=-1, model=1), grad_accum=1),
    "v6e-32": dict(mesh=dict(data=1, fsdp=-1, model=1), grad_accum=1),
    "v6e-64": dict(mesh=dict(data=1, fsdp=-1, model=1), grad_accum=1),
}


def parse_arg(arg, defaults):
  """'size=3b,res=448' -> dict over `defaults` (unknown keys are an error)."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key} must be true or false, got {value!r}")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = kind(value) if defaults[key] is not None else value
  return out


def model(role, preset, checkpoint="", param_dtype="bfloat16", dtype="bfloat16"):
  return ml_collections.ConfigDict(dict(role=role, preset=preset, checkpoint=checkpoint,
                                        dtype=dtype, param_dtype=param_dtype))


def join(base, *parts):
  """A path under `base` (local or gs://); "" when no base is given, so that
  the config check names the missing data_dir / ckpt_dir argument."""
  if not base:
    return ""
  return "/".join([base.rstrip("/"), *parts])


def jsonl(path, question_key="prefix", answer_key="suffix", **extra):
  """A big_vision-style jsonl dataset (data/named.py); `extra`: a benchmark's
  metric, prompt, max_new_tokens or field keys."""
  return dict(kind="jsonl", path=path, image_dir="", image_key="image",
              question_key=question_key, answer_key=answer_key, **extra)


def data_section(c, data_dir, seeds, benchmarks, rectify_train):
  """Seed images, benchmarks and labelled data as jsonl files under data_dir
  (`<data_dir>/<name>/<split>.jsonl`, images beside them). `benchmarks`:
  (name, split, {"metric", "prompt", ...}) triples (data/named.py: the metric
  names the record fields the jsonl lines must carry). Any entry may be
  replaced by a TFDS spec on the command line or in a derived config:
  --config.data.seed_images='{"kind": "tfds", "name": ..., "split": ...}'."""
  c.data = ml_collections.ConfigDict(dict(
      seed_images=jsonl(join(data_dir, *seeds) + (".jsonl" if data_dir else "")),
      benchmarks={name: jsonl(join(data_dir, name, split) + (".jsonl" if data_dir else ""),
                              **dict(extra))
                  for name, split, extra in benchmarks},
      rectify_train=jsonl(join(data_dir, *rectify_train) + (".jsonl" if data_dir else ""))))


def mesh_and_rules(c, slice_name):
  if slice_name not in SLICES:
    raise ValueError(f"slice must be one of {sorted(SLICES)}, got {slice_name!r}")
  c.slice = slice_name
  c.mesh = ml_collections.ConfigDict(dict(SLICES[slice_name]["mesh"]))
  # Regex partition rules over parameter paths (see auditdm_jax/sharding.py);
  # empty means sharding.PARAM_RULES: TP over heads / MLP / vocab rows, the
  # stacked layer axis never sharded, FSDP on the largest remaining dimension.
  c.partition_rules = ()


# The paper's top 15 failure types (PAPER.md), as the auditor's descriptors.
FAILURE_DESCRIPTORS = (
    "world knowledge", "clock reading", "size comparison", "action recognition",
    "sign understanding", "small text", "material", "distraction avoidance",
    "object relationship", "small object detection", "spatial relationship",
    "emotion and atmosphere", "color", "counting", "hallucination avoidance")


def audit_sections(c, prompt_len, answer_prompt_len, target="target"):
  """The audit / mine / rectify / eval sections at the paper's scale, and the
  workload the memory planner sizes (`rl`, `answers`, `plan`), from one set
  of numbers."""
  # GRPO, real-scale schedule (PAPER.md): AdamW lr 3e-6, 10% warm-up, cosine
  # to 1e-6, 1K steps, global batch 256 = 32 prompts x K=8; epsilon 0.2, beta 0.04.
  steps, prompts, k, new_tokens = 1000, 32, 8, 64
  grad_accum = SLICES[c.slice]["grad_accum"]
  c.audit = ml_collections.ConfigDict(dict(
      target=target, editor="none",      # real images, no diffusion editor: questions only
      steps=steps, prompts_per_step=prompts, mixture=dict(question=1.0),
      temperature=1.0, max_new_tokens=new_tokens, seq_len=prompt_len + new_tokens,
      grpo=dict(num_samples=k, clip_eps=0.2, kl_beta=0.04, loss_agg="token_mean",
                updates_per_batch=1),
      optim=dict(lr=3e-6, warmup=0.1, end_lr=1e-6, b2=0.999, grad_clip=1.0,
                 grad_accum=grad_accum, frozen=("^img/",)),
      answer_tokens=16,                  # greedy answer length of the target and references
      # mode "judge": `judge` (a model of this config; "" = the first
      # reference) decides where the exact comparison finds the answers differ.
      reward=dict(consensus="majority", invalid_reward=-1.0, mode="exact", soft_weight=0.0,
                  max_answer_tokens=16, judge="", judge_threshold=0.5, judge_batch=64),
      eval_budget=1000, eval_batch=64, checkpoint_every=50, log_every=10, log_examples=2,
      seed_count=256, seed_budget=8,     # the paper's per-seed search success
      # Every GRPO group's question names one of the paper's top failure types
      # (PAPER.md); an eighth ask generically, for the kinds no descriptor names.
      diversity=dict(mode="descriptors", generic=0.125, elites=8,
                     adherence="warm_likelihood", search="archive",
                     prompt="ask a question about the image that tests {descriptor}",
                     descriptors=FAILURE_DESCRIPTORS)))
  # Mining: the trained auditor over 20K seed images (the paper's audit
  # budget on VQAv2), K probes each.
  c.mine = ml_collections.ConfigDict(dict(
      auditors=("auditor_trained",), seeds=20_000, samples_per_seed=k, chunk_seeds=256,
      temperature=1.0, top_k=15, purity=0.5, merge_rate=0.5, min_probes=5))
  # Rectification: the target's labelled data mixed with its exemplars.
  c.rectify = ml_collections.ConfigDict(dict(
      target="", strategy="augment", mix_ratio=0.5, freeze_vision=True,
      seq_len=answer_prompt_len + 32, steps=2000, batch=256, lr=1e-5, warmup=0.05,
      end_lr=0.0, checkpoint_every=500, log_every=50))
  c.eval = ml_collections.ConfigDict(dict(max_examples=0, batch=64))
  # The planner's own knobs; its workload (GRPO batch, token counts, what
  # trains) it reads from the audit section above (tools/plan.workload).
  c.plan = ml_collections.ConfigDict(dict(
      slices=(c.slice,), answer_prompt_len=answer_prompt_len,
      kv_cache_dtype="bfloat16", activation_dtype="bfloat16", hbm_headroom=0.9))


# The FLUX checkpoints under ckpt_dir, as the Hugging Face repositories name
# them (diffusers pipeline directories; the Black Forest Labs single files in
# them may replace a transformer through audit.flux.*_transformer).
FLUX_EDITOR, FLUX_GENERATOR = "FLUX.1-Kontext-dev", "FLUX.1-dev"
# Our decision (the paper publishes no mixture): 40% probing questions on the
# seed, 40% edits (half with a new question on the edited image), 20%
# regenerations (half with a new question).
FLUX_MIXTURE = dict(question=0.4, edit=0.2, edit_question=0.2, caption=0.1,
                    caption_question=0.1)


def flux_editor(c, ckpt_dir):
  """audit.editor = "flux": FLUX.1 Kontext dev edits and FLUX.1 dev
  regenerates, frozen, on the run's mesh (pipeline/editing.py)."""
  c.audit.editor = "flux"
  c.audit.editor_ckpt = join(ckpt_dir, FLUX_EDITOR)
  c.audit.generator_ckpt = join(ckpt_dir, FLUX_GENERATOR)
  c.audit.mixture = dict(FLUX_MIXTURE)
  c.audit.flux = ml_collections.ConfigDict(dict(
      steps=28, edit_guidance=2.5, generate_guidance=3.5, resolution=1024, batch=8,
      auto_resize=True, dtype="bfloat16", max_sequence_length=512, editor_transformer="",
      generator_transformer="", autoencoder="", seed=0))


def runlocal(c, auditor="tiny-gemma3", answerer="tiny-paligemma2"):
  """The real config's wiring at toy sizes on CPU (big_vision's `runlocal`):
  a few steps and examples, float32, and the architecture read from the
  checkpoints in ckpt_dir (small ones, e.g. written by
  tests/test_real_config.py), or tiny presets when there are none. For
  checking a setup end to end before a TPU run."""
  for spec in c.models.values():
    if spec.checkpoint:
      spec.preset = ""
    else:
      spec.preset = auditor if spec.role == "auditor" else answerer
    spec.dtype = spec.param_dtype = "float32"
  c.audit.update(dict(steps=2, prompts_per_step=2, eval_budget=2, eval_batch=2,
                      checkpoint_every=1, log_every=1, max_new_tokens=8, seq_len=96))
  c.audit.grpo.num_samples = 2
  if c.audit.editor == "flux":   # tiny FLUX pipelines (tests write them), a few steps;
    # with 2 prompts a step, the mixture is the two image routes
    c.audit.flux.update(dict(steps=2, resolution=32, batch=2, auto_resize=False,
                             dtype="float32", max_sequence_length=16))
    c.audit.mixture = dict(edit=0.5, caption_question=0.5)
  c.audit.optim.update(dict(lr=1e-3, grad_accum=1))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, model=1))   # every model's mesh
  c.mine.update(dict(seeds=4, samples_per_seed=2, chunk_seeds=2, min_probes=1))
  c.rectify.update(dict(steps=2, batch=4, seq_len=64, checkpoint_every=1, log_every=1))
  c.eval.update(dict(max_examples=4, batch=4))
  c.audit.answer_tokens = 4
