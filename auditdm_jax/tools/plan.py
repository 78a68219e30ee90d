r"""Per-device memory plan of a config's models on named TPU slices.

  python -m auditdm_jax.tools.plan --config=configs/audit_paligemma2.py:size=3b,res=448

Everything comes from `jax.eval_shape` (no memory is allocated) and the
config's partition rules evaluated on each slice's mesh shape. Per device:

  params        every model, in its param_dtype, sharded by the rules
  grads         the auditor's trainable params (the LLM; the vision tower too
                unless audit.optim.frozen freezes `^img/`), same sharding and dtype
  optimizer     AdamW's two float32 moments for those params
  init policy   a frozen copy of the auditor (the GRPO KL reference)
  decode copy   the per-layer 2-D weights `Sampler` builds for one decoding
                call (a transient copy of the LLM weights)
  kv cache      the sampling workload's caches: global layers hold prompt +
                new tokens, sliding-window layers a window (bf16 by default)
  activations   the GRPO step with per-layer remat, per micro-batch
                (audit.optim.grad_accum micro-batches a step): the scanned carries
                (L x rows x T x D), one layer's working set, the attention
                scores and the float32 logits + log-softmax over the vocabulary

The workload is read from the sections the stages run (`workload`): the GRPO
batch is audit.prompts_per_step x audit.grpo.num_samples, the auditor writes
audit.max_new_tokens after a prompt of audit.seq_len - max_new_tokens, the
answerers audit.answer_tokens; an override of `audit.*` reaches the plan.
`plan` keeps only what is the planner's own: slices, the answer prompt
length, the KV-cache and activation dtypes and the HBM headroom. Each
model's parameters are placed by its own partition rules
(`pipeline/placement.rules`).

With `audit.editor = "flux"` two more rows, `editor` (FLUX.1 Kontext dev) and
`generator` (FLUX.1 dev), each resident for the whole audit: the transformer,
the autoencoder and both text encoders at the published shapes in
audit.flux.dtype, placed by automatic FSDP (diffusion/flux_pipeline.py), and a
phase each for one denoising forward of audit.flux.batch rows: ~16 x tokens x
width activations per row (carries, q/k/v, the single blocks' 4x MLP, the
attention output) plus float32 attention scores (heads x chunk x tokens,
queries in chunks of flux.ATTN_Q_CHUNK), tokens =
T5 length + (resolution/16)^2 image tokens (twice that for Kontext's
reference), or the autoencoder's decode at full resolution (~6 maps of 128
float32 channels per pixel), whichever is larger.

Peak = resident (params, init policy, optimizer, grads) + the largest phase:
auditor sampling, one answering model at a time, an editor's denoising, or
the training step. A
slice fits when the peak is within `plan.hbm_headroom` of its HBM. These are
planning estimates (XLA's buffer assignment and fragmentation vary); the
measured peak on a real slice is the ground truth.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import flax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from auditdm_jax import config_check, models, sharding
from auditdm_jax.pipeline import placement, sections


GIB = 1 << 30
# name prefix -> (TensorCores or chips per unit of the slice name, HBM GiB per chip)
_TPU = {
    "v4": (2, 32.0),        # v4-N: N TensorCores, 2 per chip
    "v5p": (2, 95.0),       # v5p-N: N TensorCores, 2 per chip
    "v5e": (1, 16.0),       # v5e-N / v5litepod-N: N chips
    "v5litepod": (1, 16.0),
    "v6e": (1, 32.0),       # v6e-N: N chips
}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  chips: int
  hbm_gib: float


def parse_slice(name: str) -> Slice:
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  if not m:
    raise ValueError(f"unknown TPU slice {name!r}; expected e.g. v5e-16, v5p-32, v6e-64")
  per, hbm = _TPU[m.group(1)]
  cores = int(m.group(2))
  if cores % per or cores < per:
    raise ValueError(f"{name}: {m.group(1)} slices count {per} cores per chip")
  return Slice(name, cores // per, hbm)


def _model_config(spec) -> models.VLMConfig:
  if spec.get("preset"):
    cfg = models.get_preset(spec.preset)
  else:
    raise ValueError("the planner needs a preset for every model (the architecture)")
  return cfg.with_dtypes(spec.get("dtype") or None, spec.get("param_dtype") or None)


def _param_bytes(cfg, mesh_shape, rules, only=None) -> int:
  flat = flax.traverse_util.flatten_dict(models.abstract_params(cfg), sep="/")
  total = 0
  for path, leaf in flat.items():
    if only and not path.startswith(only):
      continue
    spec = sharding.spec_for_param(path, leaf.shape, mesh_shape, rules)
    total += sharding.bytes_per_device(leaf.shape, leaf.dtype, spec, mesh_shape)
  return total


def _flux_rows(config, mesh_shape) -> dict:
  """{"editor": row, "generator": row} of a flux editor (module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  from auditdm_jax.diffusion import vae as ae  # pylint: disable=import-outside-toplevel
  from auditdm_jax.diffusion import flux, flux_pipeline, text  # pylint: disable=import-outside-toplevel
  from auditdm_jax.pipeline import editing  # pylint: disable=import-outside-toplevel
  a = config.audit
  s = editing.flux_settings(a)
  dtype = s["dtype"]
  tcfg = dataclasses.replace(flux.FLUX1_DEV, dtype=dtype)
  key = jax.random.PRNGKey(0)
  trees = {
      "transformer": flux.param_shapes(tcfg),
      "autoencoder": jax.eval_shape(lambda: ae.init_params(
          dataclasses.replace(ae.FLUX1_AE, dtype=dtype), key)),
      "t5": jax.eval_shape(lambda: text.t5_init(dataclasses.replace(text.T5_XXL, dtype=dtype), key)),
      "clip": jax.eval_shape(lambda: text.clip_init(
          dataclasses.replace(text.CLIP_L, dtype=dtype), key)),
  }
  params = 0
  for tree in trees.values():
    flat = flax.traverse_util.flatten_dict(tree, sep="/")
    for path, leaf in flat.items():
      spec = sharding.spec_for_param(path, leaf.shape, mesh_shape, flux_pipeline.REPLICATE_RULES)
      params += sharding.bytes_per_device(leaf.shape, leaf.dtype, spec, mesh_shape)
  rows_dev = _rows_per_device(int(s["batch"]), mesh_shape)
  res = int(s["resolution"])
  img = (res // 16) ** 2
  itemsize = np.dtype(np.float32 if dtype == "float32" else np.float16).itemsize
  out = {}
  needs = dict(zip(("editor", "generator"), editing.routes(config)))
  for name, refs in (("editor", 2), ("generator", 1)):
    if not needs[name]:
      continue
    tokens = int(s["max_sequence_length"]) + refs * img
    chunk = min(tokens, flux.ATTN_Q_CHUNK)   # attention runs in query chunks
    denoise = rows_dev * (16 * tokens * tcfg.width * itemsize
                          + tcfg.num_heads * chunk * tokens * 4)
    decode = rows_dev * res * res * 128 * 4 * 6
    out[name] = {"role": name, "params": params, "activations": max(denoise, decode),
                 "denoise": denoise, "vae_decode": decode}
  return out


def _rows_per_device(rows: int, mesh_shape) -> int:
  dp = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  return -(-rows // dp)


def _kv_cache_bytes(cfg, rows_dev, prefix, new, dtype, mesh_shape) -> int:
  t = cfg.text
  model = mesh_shape.get("model", 1)
  kv = t.num_kv_heads // model if t.num_kv_heads % model == 0 else t.num_kv_heads
  per_slot = 2 * kv * t.head_dim * np.dtype(dtype).itemsize + 4  # k, v, position
  slots = 0
  for kind in t.layer_types:
    full = prefix + new
    slots += min(full, t.sliding_window) if kind == "local" and t.sliding_window else full
  return rows_dev * slots * per_slot


def _train_activation_bytes(cfg, rows_dev, seq, act_dtype, mesh_shape) -> int:
  t = cfg.text
  a = np.dtype(act_dtype).itemsize
  model = mesh_shape.get("model", 1)
  carries = t.depth * rows_dev * seq * t.width * a
  layer = rows_dev * seq * (8 * t.width + 3 * t.mlp_dim // model) * 4
  scores = rows_dev * (t.num_heads // model or 1) * seq * seq * 4
  logits = 2 * rows_dev * seq * (t.vocab_size // model) * 4
  return carries + layer + scores + logits


@dataclasses.dataclass(frozen=True)
class Workload:
  """The GRPO and answering workload, from the audit section."""
  global_batch: int
  num_samples: int
  max_new_tokens: int
  auditor_prompt_len: int
  answer_tokens: int
  train_vision: bool
  grad_accum: int


def workload(config) -> Workload:
  a = config.audit
  frozen = tuple(a.optim.get("frozen", ()))
  return Workload(
      global_batch=int(a.prompts_per_step) * int(a.grpo.num_samples),
      num_samples=int(a.grpo.num_samples), max_new_tokens=int(a.max_new_tokens),
      auditor_prompt_len=int(a.seq_len) - int(a.max_new_tokens),
      answer_tokens=int(sections.settings(config, "audit")["answer_tokens"]),
      train_vision=not any(re.search(f, "img/x") for f in frozen),
      grad_accum=int(a.optim.get("grad_accum", 1)))


def plan(config, slices=None) -> dict:
  """{slice: {...}} per-device bytes; see the module docstring."""
  p = config.plan
  rl = workload(config)
  cfgs = {name: _model_config(spec) for name, spec in config.models.items()}
  roles = {name: spec.role for name, spec in config.models.items()}
  auditors = [n for n, r in roles.items() if r == "auditor"]
  if len(auditors) != 1:
    raise ValueError(f"the plan needs exactly one auditor, found {auditors}")
  auditor = auditors[0]
  prompts = rl.global_batch // rl.num_samples
  out = {}
  for name in slices or p.slices:
    sl = parse_slice(name)
    mesh_shape = sharding.resolve_axes(dict(config.mesh), sl.chips)
    rows_dev = _rows_per_device(rl.global_batch, mesh_shape)
    rows = {}
    for m, cfg in cfgs.items():
      rules = placement.rules(config, m)
      params = _param_bytes(cfg, mesh_shape, rules)
      llm = _param_bytes(cfg, mesh_shape, rules, only="llm/")
      r = {"role": roles[m], "params": params, "decode_copy": llm}
      if m == auditor:
        trainable = params if rl.train_vision else llm
        n_trainable = trainable // np.dtype(cfg.text.param_dtype).itemsize
        r["grads"] = trainable
        r["optimizer"] = 2 * n_trainable * 4
        r["init_policy"] = params
        r["kv_cache"] = _kv_cache_bytes(cfg, rows_dev, rl.auditor_prompt_len,
                                        rl.max_new_tokens, p.kv_cache_dtype, mesh_shape)
        accum = rl.grad_accum   # micro-batches of the GRPO step
        r["activations"] = _train_activation_bytes(
            cfg, -(-rows_dev // accum), rl.auditor_prompt_len + rl.max_new_tokens, p.activation_dtype,
            mesh_shape)
      else:
        r["kv_cache"] = _kv_cache_bytes(cfg, rows_dev, p.answer_prompt_len,
                                        rl.answer_tokens, p.kv_cache_dtype, mesh_shape)
      rows[m] = r
    if sections.settings(config, "audit")["editor"] == "flux":
      rows.update(_flux_rows(config, mesh_shape))
    resident = sum(r["params"] + r.get("grads", 0) + r.get("optimizer", 0)
                   + r.get("init_policy", 0) for r in rows.values())
    phases = {f"sample:{m}": r["decode_copy"] + r["kv_cache"] for m, r in rows.items()
              if "kv_cache" in r}
    phases.update({f"denoise:{m}": r["activations"] for m, r in rows.items()
                   if r["role"] in ("editor", "generator")})
    phases["train:" + auditor] = rows[auditor]["activations"]
    worst = max(phases, key=phases.get)
    peak = resident + phases[worst]
    limit = p.hbm_headroom * sl.hbm_gib * GIB
    out[name] = {"slice": sl, "mesh": mesh_shape, "rows_per_device": rows_dev,
                 "prompts": prompts, "models": rows, "resident": resident,
                 "phases": phases, "peak_phase": worst, "peak": peak,
                 "limit": limit, "fits": peak <= limit}
  return out


def _gib(n) -> str:
  return f"{n / GIB:7.2f}"


def format_plan(result: dict, config) -> str:
  lines = []
  rl, p = workload(config), config.plan
  lines.append("Per-device memory plan (GiB; estimates from jax.eval_shape and the "
               "partition rules)")
  lines.append(f"workload: GRPO batch {rl.global_batch} = {rl.global_batch // rl.num_samples}"
               f" prompts x {rl.num_samples} samples; auditor prompt {rl.auditor_prompt_len}"
               f" + {rl.max_new_tokens} new tokens; answers: prompt {p.answer_prompt_len} + "
               f"{rl.answer_tokens} new tokens; kv cache {p.kv_cache_dtype}")
  cols = ("params", "grads", "optimizer", "init_policy", "decode_copy", "kv_cache",
          "activations")
  for name, r in result.items():
    sl = r["slice"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines.append("")
    lines.append(f"{name}: {sl.chips} chips x {sl.hbm_gib:g} GiB HBM; mesh {mesh}; "
                 f"{r['rows_per_device']} rows per device")
    lines.append(f"  {'model':<10} {'role':<9} " + " ".join(f"{c:>11}" for c in cols))
    for m, row in r["models"].items():
      cells = " ".join(f"{_gib(row[c]):>11}" if c in row else f"{'-':>11}" for c in cols)
      lines.append(f"  {m:<10} {row['role']:<9} {cells}")
    lines.append(f"  resident {_gib(r['resident'])}; largest phase {r['peak_phase']} "
                 f"{_gib(r['phases'][r['peak_phase']])}; peak {_gib(r['peak'])} of "
                 f"{_gib(r['limit'])} usable -> {'fits' if r['fits'] else 'does NOT fit'}")
  fitting = [n for n, r in result.items() if r["fits"]]
  lines.append("")
  if fitting:
    best = min(fitting, key=lambda n: (result[n]["slice"].chips, result[n]["peak"]))
    lines.append(f"smallest slice that fits the auditor training step with its targets "
                 f"and references: {best}")
  else:
    lines.append("no listed slice fits; add larger slices (--slices) or more model "
                 "parallelism (mesh.model)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required")
  try:
    config_check.check(config, check_inputs=False)   # no checkpoints or data needed
    result = plan(config, flags.FLAGS.slices)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_plan(result, config))


if __name__ == "__main__":
  # Flags are defined only when run as a program, so that importing this
  # module next to auditdm_jax.main does not define --config twice.
  config_flags.DEFINE_config_file("config", None, "Pipeline config.", lock_config=True)
  flags.DEFINE_list("slices", None, "Override plan.slices, e.g. v5p-32,v6e-64.")
  app.run(main)

