"""One GRPO iteration of the auditor, ours against tunix's `GRPOLearner`:
B prompts x K samples, sample -> score -> update, at the audit stage's shapes
and settings, on the same model, prompts and scripted reward.

The model is the auditor's architecture, Gemma 3 with its SigLIP tower, at
~50M parameters by default (bench/sampling.py's shapes: width 512, 8 layers,
8 query / 4 KV heads of 64, MLP 2048, vocabulary 32000, window 1024; SigLIP
64 px, patch 8, width 256, depth 4, 16 image tokens); --width, --depth,
--vocab, --vision-width, --vision-depth and --image-size scale it. The
weights are random (`VLM.random`); ours runs the layers under one rolled
`nn.scan`, as the real presets do (--scan-unroll N: N layers an iteration;
>= depth unrolls them, as the scene presets and tunix's Python loop over
layers); tunix's actor and reference hold the same weights, converted by
bench/tunix_gemma3.py. Every row holds its seed image, as the
auditor's prompts do. One batch of B prompts (BOS, <start_of_image>, random
text ids: `--prompt-len` text tokens), the same every iteration.

Settings, both sides (configs/tiny.py's `audit` section): K samples per prompt
(one group), temperature 1.0 (no top-k / top-p), `--max-new-tokens` new
tokens, stop id EOS; clip epsilon 0.2, KL beta 0.04 to a frozen reference copy
(the k3 estimator: tunix kl_loss_mode "low_var_kl"), token-mean loss
aggregation, one update per batch (so the ratio is 1 and old log-probs are the
current ones under stop_gradient: ours updates_per_batch=1, tunix
num_iterations=1), AdamW lr 1e-3 (constant), b1 0.9, b2 0.99, eps 1e-8, no
weight decay, global-norm clip 1.0. The SigLIP tower does not train on
either side: tunix's Gemma 3 stops the gradient at the tower's output (SigLiP
apply_stop_gradient, which its ModelConfig cannot turn off), ours freezes img/
as the real configs do (configs/common.py; tiny.py's audit trains it); tunix's
AdamW still keeps moments for the tower and updates it with zero gradients.
The scripted reward, computed on host by one function both sides call: the
share of a completion's tokens (up to its stop token) whose id is a multiple
of 4.

Ours (`auditdm_jax`, unmodified) is what `audit.learner.GRPOLearner.step`
does for a question-only mixture, minus the scene world (editor, answerers,
descriptors, journal): `Sampler.set_params` + `Sampler.sample` (K samples per
prompt) -> the scripted reward -> `grpo.group_advantages` -> `grpo.grpo_batch`
(second_rows = 0, as `build_batch` packs a question-only step) ->
`GRPOTrainer.logprobs` of the reference -> `GRPOTrainer.step`, whose metrics
come back to the host as the learner reads them. As in the audit stage
(`pipeline/recipes.audit_configs`), TrainConfig.loss_slots = --max-new-tokens:
both project onto the vocabulary only at the completion tokens (tunix projects
every position and slices the completion's logits after).

tunix 0.1.7: `RLCluster` (actor, reference and rollout on one mesh, so actor
and rollout share weights and no sync runs), the vanilla rollout (its KV-cache
`Sampler`), `GRPOLearner` with GRPOConfig(num_generations=K, num_iterations=1,
beta=0.04, epsilon=0.2, loss_agg_mode="token-mean", kl_loss_mode="low_var_kl"),
driven by `learner.train` over 1 + repeats + 1 copies of the batch (one
global step each). What differs and could not be removed:
  - tunix's RL stack passes no images (rollout, reference and policy
    log-probabilities call the model with tokens only), so its actor and
    reference are wrapped (`tunix_gemma3.with_image_rows`) to feed every row
    its image and Gemma 3's image-block attention mask to full forwards; the
    work equals a VLM's, the wrapper is ours.
  - tunix's advantages divide by the group's sample std (ddof 1) + 1e-6, ours
    by the population std + 1e-4: the same direction, scaled by ~sqrt(K/(K-1)).
  - tunix cuts each completion before its stop token, so the stop token is
    not trained; ours trains it (with random weights a stop is rarely drawn:
    rows run to --max-new-tokens on both sides).
  - tunix prefills B*K rows (the prompts repeated), ours B rows whose caches it
    repeats; our prefill pads the prompt to a multiple of 16, tunix to its
    length. Both draw with the iteration as the seed (tunix: RolloutConfig.seed
    set before each global step), so the samples differ between the sides.

Before timing, the sides must agree: the reference log-probabilities of the
same completions (ours' first samples) under ours and under tunix's RL scoring
(through the wrapper) differ by at most 2e-3 (else the bench stops).
tests/test_tunix_grpo.py checks the rest on one batch: loss, KL, entropy and
gradient norm of our step equal tunix's GRPO loss.

Timing: one warm-up iteration per side (compiles), then `--repeats`
iterations; the figure is B*K completions / the median iteration time. Ours'
iterations are timed whole; tunix's from the start of one global
step to the start of the next (everything `train` does per step). The split:
sampling (ours: set_params + sample to host tokens; tunix: `generate`),
scoring (the reward function + the reference log-probabilities, blocked),
update (ours: `GRPOTrainer.step`; tunix: `update_actor`, its trainer loop),
host work (the rest: rows, advantages, batches, bookkeeping). XLA compiles
after the warm-up are counted per side (jax.monitoring) and named.

  pip install -e ".[bench]"     # tunix (a virtualenv of its own)
  python bench/grpo.py [--platform cpu|gpu|tpu] [--batch 8] [--samples 8]
                       [--max-new-tokens 40] [--repeats 5] [--threads N]
                       [--scan-unroll 1] [--width 512 --depth 8 --vocab 32000 ...]
The last line is `speedup vs tunix: X.XXx` (ours' samples/s over tunix's).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/tiny.py `audit` (grpo, optim) and the auditor's sampling.
CLIP_EPS, KL_BETA, LR, B1, B2, EPS, GRAD_CLIP = 0.2, 0.04, 1e-3, 0.9, 0.99, 1e-8, 1.0
TEMPERATURE = 1.0
FROZEN = ("^img/",)   # tunix's Gemma 3 stops the gradient at the SigLIP output
AGREE_TOL = 2e-3


def scripted_reward(ids) -> float:
  """The share of a completion's tokens (stop token excluded) whose id is a
  multiple of 4; 0 for an empty completion."""
  ids = np.asarray(list(ids), np.int64)
  return float(np.mean(ids % 4 == 0)) if ids.size else 0.0


def _config(args):
  from auditdm_jax.models import presets  # pylint: disable=import-outside-toplevel
  v, w, vw = args.vocab, args.width, args.vision_width
  heads = max(2, w // 64)
  patches = (args.image_size // 8) ** 2
  cfg = presets.tiny_gemma3(vocab_size=v, width=w, depth=args.depth,
                            image_size=args.image_size, patch_size=8, vision_width=vw,
                            vision_depth=args.vision_depth, mm_tokens_per_image=patches // 4,
                            sliding_window=1024, num_heads=heads,
                            num_kv_heads=max(1, heads // 2), head_dim=w // heads,
                            mlp_dim=4 * w, boi_id=v - 4, eoi_id=v - 3, image_token_id=v - 1)
  vision = dataclasses.replace(cfg.vision, mlp_dim=4 * vw, num_heads=max(2, vw // 64),
                               scan_unroll=min(args.scan_unroll, args.vision_depth))
  text = dataclasses.replace(cfg.text, scan_unroll=min(args.scan_unroll, args.depth))
  return cfg.replace(variant=f"bench-gemma3-w{w}-d{args.depth}", vision=vision, text=text)


class Compiles:
  """XLA compiles (jax.monitoring's backend-compile events) by label."""

  def __init__(self):
    import jax  # pylint: disable=import-outside-toplevel
    from jax._src import dispatch  # pylint: disable=import-outside-toplevel
    self.label, self.events = None, []
    self._event = dispatch.BACKEND_COMPILE_EVENT
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kw):
    if event == self._event:
      self.events.append((self.label, kw.get("fun_name", "?"), float(duration)))

  def of(self, label):
    return [(name, d) for lab, name, d in self.events if lab == label]


def _first_stop(row, stops) -> list[int]:
  out = []
  for t in row:
    if int(t) in stops:
      break
    out.append(int(t))
  return out


class Ours:
  """The learner's step pieces (see the module doc)."""

  def __init__(self, model, images, prompts, args, stops):
    # pylint: disable=import-outside-toplevel
    import jax
    from auditdm_jax.audit import grpo
    from auditdm_jax.models.inputs import prompt_heads
    from auditdm_jax.sampling import Sampler, SamplingParams
    from auditdm_jax.train.config import TrainConfig
    # pylint: enable=import-outside-toplevel
    self.cfg, self.k, self.stops = model.config, args.samples, stops
    self.gcfg = grpo.GRPOConfig(num_samples=args.samples, clip_eps=CLIP_EPS, kl_beta=KL_BETA,
                                loss_agg="token_mean", updates_per_batch=1)
    tcfg = TrainConfig(steps=10_000, lr=LR, warmup_steps=0, schedule="constant", b1=B1, b2=B2,
                       eps=EPS, grad_clip=GRAD_CLIP, grad_accum=1, frozen=FROZEN,
                       loss_slots=args.max_new_tokens,   # as the audit stage (recipes)
                       tensorboard=False, progress=False)
    self.trainer = grpo.GRPOTrainer(self.cfg, tcfg, self.gcfg)
    self.sampler = Sampler(model, self.trainer.mesh)
    self.warm = jax.device_put(model.params, self.trainer.param_shardings)
    self.state = self.trainer.init_state(model.params)
    self.sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE,
                             num_samples=args.samples)
    self.images, self.prompts = images, prompts
    rows = np.arange(len(prompts) * args.samples) // args.samples
    self.images_rows, self.prompts_rows = images[rows], [prompts[i] for i in rows]
    self.seq_len = max(len(h) for h in prompt_heads(self.cfg, prompts)) + args.max_new_tokens
    self.last_batch, self.metrics = None, []

  def iteration(self, it: int) -> dict:
    # pylint: disable=import-outside-toplevel
    import jax
    from auditdm_jax import sharding
    from auditdm_jax.audit import grpo
    # pylint: enable=import-outside-toplevel
    t0 = time.perf_counter()
    self.sampler.set_params(self.state["params"])
    out = self.sampler.sample(self.images, self.prompts, self.sp, rng=jax.random.key(it),
                              stop_ids=self.stops)
    t1 = time.perf_counter()
    rows = out.rows()                                  # with the stop token, as the rollout
    t2 = time.perf_counter()
    rewards = np.asarray([scripted_reward(_first_stop(r, self.stops)) for r in rows],
                         np.float32)
    t3 = time.perf_counter()
    adv = np.asarray(grpo.group_advantages(rewards, self.k, self.gcfg.adv_eps,
                                           self.gcfg.scale_rewards))
    batch = grpo.grpo_batch(self.cfg, self.images_rows, self.prompts_rows,
                            [r or [0] for r in rows], adv, self.seq_len, self.gcfg.loss_agg)
    t4 = time.perf_counter()
    batch["ref_logp"] = self.trainer.logprobs(self.warm, batch)
    t5 = time.perf_counter()
    self.state, m = self.trainer.step(self.state, sharding.local_rows(batch))
    t6 = time.perf_counter()
    self.metrics.append({k: float(m[k]) for k in ("loss", "kl", "entropy", "grad_norm")})
    self.last_batch = (rows, batch, rewards)
    t7 = time.perf_counter()
    total = t7 - t0
    phases = {"sampling": t1 - t0, "scoring": (t3 - t2) + (t5 - t4), "update": t6 - t5}
    phases["host"] = total - sum(phases.values())
    return {"time": total, **phases}


class Tunix:
  """tunix's RLCluster + GRPOLearner on the same model (see the module doc)."""

  def __init__(self, model, images, heads, args, stops, compiles: Compiles):
    # pylint: disable=import-outside-toplevel
    import jax
    import optax
    from jax.sharding import Mesh
    from tunix.rl import rl_cluster as rlc
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
    from bench import tunix_gemma3
    # pylint: enable=import-outside-toplevel
    self.jax, self.tg = jax, tunix_gemma3
    cfg = model.config
    self.k, self.n, self.stops = args.samples, args.max_new_tokens, stops
    self.heads = heads
    self.prompt_len = max(len(h) for h in heads)
    if any(len(h) != self.prompt_len for h in heads):
      raise ValueError("the bench's prompts must have one length (tunix pads on the left)")
    row_pixels = np.repeat(tunix_gemma3.pixels(images), args.samples, axis=0)
    actor = tunix_gemma3.with_image_rows(
        tunix_gemma3.to_tunix(cfg, model.params, sampling=False), row_pixels)
    reference = tunix_gemma3.with_image_rows(
        tunix_gemma3.to_tunix(cfg, model.params, sampling=False), row_pixels)
    devices = np.array(jax.devices()).reshape(-1, 1)
    mesh = Mesh(devices, ("fsdp", "tp"))
    tx = optax.chain(optax.clip_by_global_norm(GRAD_CLIP),
                     optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=0.0))
    self.total_steps = 1 + args.repeats + 1          # warm-up, timed, one to end the last
    cluster_config = rlc.ClusterConfig(
        role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rlc.RLTrainingConfig(
            actor_optimizer=tx, eval_every_n_steps=10**9, max_steps=self.total_steps,
            metrics_logging_options=None, checkpoint_root_directory=None),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=self.n, temperature=TEMPERATURE, top_p=1.0, top_k=None,
            max_prompt_length=self.prompt_len, kv_cache_size=self.prompt_len + self.n,
            eos_tokens=list(stops)))
    self.rollout_config = cluster_config.rollout_config
    self.cluster = rlc.RLCluster(actor=actor, reference=reference,
                                 tokenizer=tunix_gemma3._IdTokenizer(),  # pylint: disable=protected-access
                                 cluster_config=cluster_config)
    algo = grpo_learner.GRPOConfig(num_generations=args.samples, num_iterations=1,
                                   beta=KL_BETA, epsilon=CLIP_EPS, loss_agg_mode="token-mean",
                                   kl_loss_mode="low_var_kl")
    self.learner = grpo_learner.GRPOLearner(self.cluster, algo, self._reward)
    self.compiles = compiles
    self.starts, self.phases = [], []
    self._wrap()

  def _reward(self, prompts, completions, **_):
    t0 = time.perf_counter()
    out = [scripted_reward(int(x) for x in c.split()) for c in completions]
    self._add("scoring", time.perf_counter() - t0)
    return out

  def _add(self, phase, dt):
    self.phases[-1][phase] += dt

  def _wrap(self):
    """Instance-level timers around the learner's phases (tunix unmodified)."""
    jax, cluster, learner = self.jax, self.cluster, self.learner

    def timed(fn, phase, block=False):
      def run(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        if block:
          jax.block_until_ready(out)
        self._add(phase, time.perf_counter() - t0)
        return out
      return run

    cluster.generate = timed(cluster.generate, "sampling")
    cluster.get_ref_per_token_logps = timed(cluster.get_ref_per_token_logps, "scoring", True)
    cluster.update_actor = timed(cluster.update_actor, "update")
    step = learner._run_global_step  # pylint: disable=protected-access

    def global_step(*a, **kw):
      self.starts.append(time.perf_counter())
      self.phases.append({"sampling": 0.0, "scoring": 0.0, "update": 0.0})
      self.compiles.label = ("tunix", len(self.starts) - 1)
      self.rollout_config.seed = len(self.starts) - 1   # fresh draws, as ours (a traced key)
      return step(*a, **kw)

    learner._run_global_step = global_step  # pylint: disable=protected-access

  def prompt_strings(self):
    return np.array([" ".join(map(str, h)) for h in self.heads])

  def reference_logps(self, rows) -> np.ndarray:
    """tunix's RL scoring of the reference: log p of each completion token
    [B*K, N] (completions cut at their stop token, padded)."""
    jnp = self.jax.numpy
    pad = self.tg.PAD_ID
    prompts = np.repeat(np.asarray(self.heads, np.int32), self.k, axis=0)
    comp = np.full((len(rows), self.n), pad, np.int32)
    for i, r in enumerate(rows):
      c = _first_stop(r, self.stops)
      comp[i, :len(c)] = c
    out = self.cluster.inference_worker.get_ref_per_token_logps(
        jnp.asarray(prompts), jnp.asarray(comp), pad, pad, temperature=TEMPERATURE)
    return np.asarray(out)

  def run(self) -> list[dict]:
    """learner.train over total_steps copies of the batch; per global step
    its time (start to next start) and phases, from the second on."""
    batch = {"prompts": self.prompt_strings()}
    self.learner.train([dict(batch) for _ in range(self.total_steps)])
    if len(self.starts) != self.total_steps:
      raise RuntimeError(f"tunix ran {len(self.starts)} global steps, expected "
                         f"{self.total_steps}")
    out = []
    for i in range(1, self.total_steps - 1):
      total = self.starts[i + 1] - self.starts[i]
      ph = dict(self.phases[i])
      ph["host"] = total - sum(ph.values())
      out.append({"time": total, **ph})
    return out

  def warmup_time(self) -> float:
    return self.starts[1] - self.starts[0]

  def history(self, name: str) -> np.ndarray:
    logger = self.cluster.actor_trainer.metrics_logger
    return np.asarray(logger.get_metric_history("actor", name, "train"), np.float64)


def _split(iters: list[dict]) -> dict:
  return {k: float(np.median([it[k] for it in iters]))
          for k in ("time", "sampling", "scoring", "update", "host")}


def _line(name, med, samples, best) -> str:
  t = med["time"]
  parts = ", ".join(f"{k} {med[k]:.3f}s ({100 * med[k] / t:.0f}%)"
                    for k in ("sampling", "scoring", "update", "host"))
  return (f"{name + ':':7s}{samples / t:9.1f} samples/s (iteration median {t:.3f}s, best "
          f"{best:.3f}s): {parts}")


def _compile_note(compiles: list) -> str:
  if not compiles:
    return "none"
  names = sorted({n for n, _ in compiles})
  return (f"{len(compiles)} ({sum(d for _, d in compiles):.1f}s: "
          f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''})")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default=None,
                  help="JAX platform (sets JAX_PLATFORMS before jax is imported); "
                       "default: jax's choice")
  ap.add_argument("--threads", type=int, default=None,
                  help="CPU cores the process may use (os.sched_setaffinity, set before "
                       "jax starts; both sides share them); default: all")
  ap.add_argument("--batch", type=int, default=8, help="prompts per iteration (B)")
  ap.add_argument("--samples", type=int, default=8, help="samples per prompt (K, the group)")
  ap.add_argument("--max-new-tokens", type=int, default=40)
  ap.add_argument("--prompt-len", type=int, default=16,
                  help="text tokens per prompt (BOS and <start_of_image> included)")
  ap.add_argument("--repeats", type=int, default=5, help="timed iterations per side")
  ap.add_argument("--width", type=int, default=512)
  ap.add_argument("--depth", type=int, default=8)
  ap.add_argument("--vocab", type=int, default=32_000)
  ap.add_argument("--vision-width", type=int, default=256)
  ap.add_argument("--vision-depth", type=int, default=4)
  ap.add_argument("--image-size", type=int, default=64, help="multiple of 16 (patch 8, 2x2 pool)")
  ap.add_argument("--scan-unroll", type=int, default=1,
                  help="ours: layers per iteration of the layer scans (1: rolled, as the real "
                       "presets; >= depth: unrolled, as the scene presets and tunix)")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  problems = [f"--{k.replace('_', '-')} must be >= {lo}" for k, lo in
              (("batch", 1), ("samples", 2), ("max_new_tokens", 1), ("prompt_len", 2),
               ("repeats", 1), ("depth", 1), ("vision_depth", 1), ("scan_unroll", 1))
              if getattr(args, k) < lo]
  for name, w in (("width", args.width), ("vision-width", args.vision_width)):
    heads = max(2, w // 64)
    if w < 16 or w % heads or (w // heads) % 2:
      problems.append(f"--{name} {w}: {heads} heads need an even head size")
  if args.image_size < 16 or args.image_size % 16:
    problems.append("--image-size must be a multiple of 16")
  if args.vocab < 64:
    problems.append("--vocab must be >= 64")
  if problems:
    ap.error("; ".join(problems))
  if args.platform:
    os.environ["JAX_PLATFORMS"] = args.platform
  if args.threads:
    cores = sorted(os.sched_getaffinity(0))
    if args.threads > len(cores):
      ap.error(f"--threads {args.threads}: this process may use {len(cores)} cores")
    os.sched_setaffinity(0, cores[:args.threads])

  # pylint: disable=import-outside-toplevel
  import jax
  sys.path.insert(0, ROOT)
  if importlib.util.find_spec("tunix") is None:
    sys.exit("bench/grpo.py needs tunix, its peer: install the bench's peers in a "
             "virtualenv of their own: pip install -e \".[bench]\"")
  from auditdm_jax import models
  from bench import tunix_gemma3
  from auditdm_jax.models.inputs import prompt_heads
  # pylint: enable=import-outside-toplevel

  cfg = _config(args)
  b, k, n = args.batch, args.samples, args.max_new_tokens
  dev = jax.devices()[0]
  print(f"model: {cfg.variant}, {models.count_params(cfg) / 1e6:.1f}M parameters (decoder "
        f"{cfg.text.depth} layers of width {cfg.text.width}, vocabulary {cfg.text.vocab_size}, "
        f"ours' layer scan {_unroll_note(cfg.text)}; "
        f"SigLIP {cfg.vision.image_size} px, {cfg.mm_tokens_per_image} image tokens); "
        f"{b} prompts x {k} samples, {n} new tokens; jax {jax.__version__} on {dev.platform} "
        f"({dev.device_kind}, {jax.device_count()} device(s)), {len(os.sched_getaffinity(0))} "
        f"CPU cores; tunix {tunix_gemma3.installed_version('google-tunix')}", flush=True)

  model = models.VLM.random(cfg, args.seed)
  rng = np.random.default_rng(args.seed)
  v, s = cfg.text.vocab_size, cfg.vision.image_size
  prompts = [[2, cfg.boi_id] + rng.integers(3, v - 4, args.prompt_len - 2).tolist()
             for _ in range(b)]
  images = rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
  heads = prompt_heads(cfg, prompts)
  stops = {cfg.eos_id}
  compiles = Compiles()

  ours = Ours(model, images, prompts, args, sorted(stops))
  tunix = Tunix(model, images, heads, args, sorted(stops), compiles)
  samples = b * k

  # Ours: a warm-up iteration (compiles), then the timed ones.
  compiles.label = ("ours", 0)
  t0 = time.perf_counter()
  ours.iteration(0)
  ours_warm = time.perf_counter() - t0
  rows, batch, _ = ours.last_batch

  # The sides must agree before anything is timed: the reference log-probs
  # of ours' first completions, ours vs tunix's RL scoring.
  compiles.label = ("check", 0)
  theirs = tunix.reference_logps(rows)
  p = len(heads[0])
  diffs = []
  for i, r in enumerate(rows):
    c = len(_first_stop(r, stops))
    diffs.append(np.abs(batch["ref_logp"][i, p:p + c] - theirs[i, :c]))
  diff = np.concatenate(diffs)
  if not diff.size or not diff.max() <= AGREE_TOL:
    sys.exit(f"equality check failed: reference log-probs of the same completions, ours vs "
             f"tunix, max |diff| {diff.max() if diff.size else float('nan'):.2e} > "
             f"{AGREE_TOL} over {diff.size} tokens; not timing different computations")
  print(f"equality: reference log-probs of ours' first {len(rows)} completions ({diff.size} "
        f"tokens), ours vs tunix's RL scoring (images through the wrapper): max |diff| "
        f"{diff.max():.2e} (mean |log p| {np.abs(theirs[theirs != 0]).mean():.2f})", flush=True)

  ours_iters = []
  for it in range(1, args.repeats + 1):
    compiles.label = ("ours", it)
    ours_iters.append(ours.iteration(it))
  tunix_iters = tunix.run()

  ours_med, tunix_med = _split(ours_iters), _split(tunix_iters)
  ours_re = [c for it in range(1, args.repeats + 1) for c in compiles.of(("ours", it))]
  tunix_re = [c for it in range(1, tunix.total_steps) for c in compiles.of(("tunix", it))]
  print(f"warm-up iteration (compiles + one run): ours {ours_warm:.1f}s "
        f"({len(compiles.of(('ours', 0)))} compiles), tunix {tunix.warmup_time():.1f}s "
        f"({len(compiles.of(('tunix', 0)))} compiles)")
  print(f"compiles after the warm-up: ours {_compile_note(ours_re)}; tunix "
        f"{_compile_note(tunix_re)}")
  om = ours.metrics[1:]
  try:
    tl, tk = tunix.history("loss")[1:-1], tunix.history("kl")[1:-1]
    tunix_note = (f"tunix loss {np.mean(tl):+.4f}, kl {np.mean(tk):.2e}")
  except ValueError as e:
    tunix_note = f"tunix metrics unavailable ({e})"
  print(f"training (timed iterations, mean): ours loss "
        f"{np.mean([m['loss'] for m in om]):+.4f}, kl {np.mean([m['kl'] for m in om]):.2e}, "
        f"grad norm {np.mean([m['grad_norm'] for m in om]):.3f}; {tunix_note}")
  print(_line("ours", ours_med, samples, min(it["time"] for it in ours_iters)))
  print(_line("tunix", tunix_med, samples, min(it["time"] for it in tunix_iters)))
  print(f"(median of {args.repeats} iterations each; {samples} completions of up to {n} "
        f"tokens an iteration)")
  print(f"speedup vs tunix: {tunix_med['time'] / ours_med['time']:.2f}x")


def _unroll_note(text) -> str:
  if text.scan_unroll >= text.depth:
    return "unrolled"
  return "rolled" if text.scan_unroll == 1 else f"unrolled by {text.scan_unroll}"


if __name__ == "__main__":
  main()
