"""Decode throughput of our KV-cache sampler vs tunix's Sampler and
transformers' `generate`, and ours as a share of the machine's read bandwidth.

The model is the auditor's architecture, Gemma 3 (a SigLIP tower and a Gemma 3
decoder: QK-norm, post-norms, 5 local : 1 global layers, window 1024 as in the
real presets, RoPE bases 10k / 1M with linear scale 8 on the global layers),
at ~50M parameters: width 512, 8 layers, 8 query / 4 KV heads of 64, MLP 2048,
vocabulary 32000; SigLIP 64 px, patch 8, width 256, depth 4, its 64 patches
2x2-pooled to 16 image tokens. One set of random float32 weights serves all
three: transformers' Gemma3ForConditionalGeneration is randomised, loaded into
ours (`models.load`), and ours is converted into tunix's nnx Gemma 3
(bench/tunix_gemma3.py). Every row holds an image: our sampler takes Gemma 3
prompts with their image block, and tunix 0.1.7 has the vision tower, so the
same inputs go to all three. The image only enters the prefill; decode steps,
which are what is timed, never touch it. tunix's Gemma 3 can express
everything this config uses (tunix_gemma3.tunix_config names what it cannot).

Before any timing, the peers must agree: greedy decode of the benchmark's
prompts for --new-tokens tokens gives identical token ids with ours and
tunix's Sampler (else the bench stops), with max |logit diff| of the first
new token's logits against our full forward pass; transformers' agreement is
printed too.

Decode tokens/s excludes the prefill and compilation: (time to generate N
tokens - time to generate 1 token), each the median (and best) of --repeats
runs after a compiling run, the three implementations alternating. tunix runs
with a cache of exactly prompt + N slots (its Sampler keeps one full-length
cache per layer; ours keeps rings of `window` slots on local layers, which at
these lengths are full length too).

The read roofline is a jitted sum over a ~200 MB float32 array, measured in
every round beside the decode runs (median GB/s of 10 sums a round; the
median over rounds is used, and each round's own figure is printed too: this
machine's bandwidth drifts by a quarter within minutes); ours reads per
decode step the decoder's weights (the embedding table once, for the logits)
and its whole KV cache (every slot, masked or not): bytes per step / (time
per step) / bandwidth. Beside it, in every round, `products_only`: a step of
the decode's matrix products alone on the same weights, the ceiling XLA's own
products set for any decode step on this machine.

Also printed: our time per decoded token around positions 32 and 512 and the
compile times. The last three lines are, for scripts:
  speedup vs tunix: X.XXx
  speedup vs transformers: X.XXx
  read roofline: NN%

  pip install -e ".[bench]"     # tunix + transformers (a virtualenv of its own)
  python bench/sampling.py [--platform cpu|gpu|tpu] [--new-tokens 128] [--batch 8]
                           [--threads N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(sliding_window: int):
  from auditdm_jax.models import presets  # pylint: disable=import-outside-toplevel
  v = 32_000
  cfg = presets.tiny_gemma3(vocab_size=v, width=512, depth=8, image_size=64, patch_size=8,
                            vision_width=256, vision_depth=4, mm_tokens_per_image=16,
                            sliding_window=sliding_window, num_heads=8, num_kv_heads=4,
                            head_dim=64, mlp_dim=2048, boi_id=v - 4, eoi_id=v - 3,
                            image_token_id=v - 1)
  vision = dataclasses.replace(cfg.vision, mlp_dim=1024, num_heads=4)
  return cfg.replace(variant="bench-gemma3-50m", vision=vision)


def _time(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _nbytes(tree) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def read_bandwidth(mb: int = 200, repeats: int = 20) -> float:
  """Median GB/s of a jitted sum over a float32 array of `mb` MB."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jnp.ones((mb * 1_000_000 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  times = [_time(lambda: total(x).block_until_ready()) for _ in range(repeats)]
  return x.nbytes / float(np.median(times)) / 1e9


def products_only(cfg, llm_params, batch: int):
  """A jitted decode step that does nothing but its matrix products: per layer
  x @ qkv, @ out, @ gate_up, @ down on `decode_weights`' matrices (a slice and
  the gated GELU between them so each product feeds the next), then the logits
  against the transposed embedding table. It reads the same weights as a
  decode step and does the same multiply-adds, without attention, norms,
  RoPE, the KV cache or sampling: the step time XLA's own products allow,
  the ceiling for any decode built on them. Returns (fn, args)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from auditdm_jax.models import decode  # pylint: disable=import-outside-toplevel
  t = cfg.text
  # On the device, as the sampler's weights are (a loaded model's params are
  # host arrays, which a jitted call would copy over at every call).
  mats = jax.device_put([{k: w[k] for k in ("qkv", "out", "gate_up", "down")}
                         for w in decode.decode_weights(t, llm_params["layers"])])
  head = jax.device_put(np.ascontiguousarray(
      np.asarray(llm_params["embedder"]["input_embedding"]).T))
  x = jnp.ones((batch, t.width), jnp.dtype(t.dtype))

  @jax.jit
  def step(x, mats, head):
    for w in mats:
      att = jnp.dot(x, w["qkv"])[:, :t.num_heads * t.head_dim]
      x = x + jnp.dot(att, w["out"])
      y = jnp.dot(x, w["gate_up"])
      x = x + jnp.dot(jax.nn.gelu(y[:, :t.mlp_dim]) * y[:, t.mlp_dim:], w["down"])
    return jnp.dot(x, head, preferred_element_type=jnp.float32)

  return step, (x, mats, head)


def _decode_bytes(cfg, llm_params, cache_lengths, batch, cache_itemsize) -> tuple[int, int]:
  """(weight bytes, KV-cache bytes) one decode step reads: the decoder's
  weights without the vision projection, and k, v and positions of every slot."""
  weights = {k: v for k, v in llm_params.items() if k != "embedder"}
  w = _nbytes(weights) + _nbytes(llm_params["embedder"]["input_embedding"])
  t = cfg.text
  kv = sum(batch * c * (2 * t.num_kv_heads * t.head_dim * cache_itemsize + 4)
           for c in cache_lengths)
  return w, kv


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default=None,
                  help="JAX platform (sets JAX_PLATFORMS before jax is imported); "
                       "default: jax's choice")
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt-len", type=int, default=16,
                  help="text tokens per prompt (BOS and <start_of_image> included)")
  ap.add_argument("--sliding-window", type=int, default=1024)
  ap.add_argument("--threads", type=int, default=os.cpu_count(),
                  help="torch threads (transformers' generate)")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  if args.new_tokens < 2 or args.repeats < 1 or args.prompt_len < 2:
    ap.error("--new-tokens must be >= 2, --repeats >= 1, --prompt-len >= 2")
  if args.platform:
    os.environ["JAX_PLATFORMS"] = args.platform

  # pylint: disable=import-outside-toplevel
  import jax
  import torch
  sys.path.insert(0, ROOT)
  if importlib.util.find_spec("tunix") is None:
    sys.exit("bench/sampling.py needs tunix, its peer: install the bench's peers in a "
             "virtualenv of their own: pip install -e \".[bench]\"")
  from bench import tunix_gemma3
  from auditdm_jax import models
  from auditdm_jax.models.ckpt import hf as hf_io
  from auditdm_jax.models.gemma3 import expand_image_tokens
  from auditdm_jax.models.inputs import bucket_length
  from auditdm_jax.sampling import Sampler, SamplingParams
  from transformers import Gemma3Config, Gemma3ForConditionalGeneration
  from transformers.utils import logging as hf_logging
  # pylint: enable=import-outside-toplevel
  hf_logging.disable_progress_bar()

  torch.set_num_threads(args.threads)
  torch_device = "cuda" if args.platform == "gpu" and torch.cuda.is_available() else "cpu"
  cfg = _config(args.sliding_window)
  print(f"model: {cfg.variant}, {models.count_params(cfg) / 1e6:.1f}M parameters "
        f"(decoder {cfg.text.depth} layers of width {cfg.text.width}, window "
        f"{cfg.text.sliding_window}); batch {args.batch}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), tunix "
        f"{tunix_gemma3.installed_version('google-tunix')}, torch {torch.__version__} on "
        f"{torch_device} ({args.threads} threads), transformers "
        f"{tunix_gemma3.installed_version('transformers')}")

  # One set of random weights for all: build the HF model, load it into ours,
  # convert ours into tunix's.
  hf_model = Gemma3ForConditionalGeneration(Gemma3Config(**hf_io.hf_config_dict(cfg))).eval()
  with torch.no_grad():
    g = torch.Generator().manual_seed(0)
    for name, p in hf_model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * (0.2 if "norm" in name else 0.02))
  with tempfile.TemporaryDirectory() as d:
    hf_model.save_pretrained(d)
    ours = models.load(d)
  hf_model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  hf_model.to(torch_device)

  rng = np.random.default_rng(0)
  v, s, n = cfg.text.vocab_size, cfg.vision.image_size, args.new_tokens

  def make_prompts(text_len):
    return [[2, cfg.boi_id] + rng.integers(3, v - 4, text_len - 2).tolist()
            for _ in range(args.batch)]

  images = rng.integers(0, 256, (args.batch, s, s, 3), dtype=np.uint8)
  prompts = make_prompts(args.prompt_len)
  prefix = len(expand_image_tokens(prompts[0], cfg))
  sampler = Sampler(ours)
  peer = tunix_gemma3.TunixGemma3(ours, cache_size=prefix + n)

  def ours_gen(k, prompts=prompts):
    return sampler.sample(images, prompts, SamplingParams(k, temperature=0.0), stop_ids=[])

  def tunix_gen(k, return_logits=False):
    return peer.generate(images, prompts, k, return_logits=return_logits)

  ids = torch.tensor([expand_image_tokens(p, cfg) for p in prompts], device=torch_device)
  token_type_ids = (ids == cfg.image_token_id).long()
  pixels = torch.tensor(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
  pixels = pixels.to(torch_device)

  def hf_gen(k, **kw):
    with torch.no_grad():
      return hf_model.generate(input_ids=ids, pixel_values=pixels,
                               token_type_ids=token_type_ids,
                               attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=k, min_new_tokens=k, eos_token_id=None,
                               pad_token_id=0, **kw)

  # Compile (the first call per shape), then check the peers agree.
  t0 = time.perf_counter()
  ours_gen(1)
  compile_1 = time.perf_counter() - t0
  t0 = time.perf_counter()
  ours_out = ours_gen(n)
  compile_n = time.perf_counter() - t0
  t0 = time.perf_counter()
  tunix_gen(1)
  tunix_compile_1 = time.perf_counter() - t0
  t0 = time.perf_counter()
  tunix_tokens = tunix_gen(n)[0]
  tunix_compile_n = time.perf_counter() - t0
  ours_tokens = np.asarray(ours_out.tokens)
  if not np.array_equal(ours_tokens, tunix_tokens):
    bad = [i for i in range(args.batch) if not np.array_equal(ours_tokens[i], tunix_tokens[i])]
    i = bad[0]
    j = int(np.argmax(ours_tokens[i] != tunix_tokens[i]))
    sys.exit(f"equality check failed: greedy tokens of ours and tunix differ in rows {bad} "
             f"(row {i} from new token {j}: ours {ours_tokens[i, j:j + 5].tolist()}, tunix "
             f"{tunix_tokens[i, j:j + 5].tolist()}); not timing different computations")
  ref_logits = tunix_gemma3.last_prompt_logits(ours, images, prompts)
  tunix_logits = np.stack([row[0] for row in tunix_gen(n, return_logits=True)[1]])
  hf_out = hf_gen(n, output_logits=True, return_dict_in_generate=True)
  hf_tokens = hf_out.sequences[:, ids.shape[1]:].cpu().numpy()
  hf_logits = hf_out.logits[0].float().cpu().numpy()
  hf_rows = sum(np.array_equal(ours_tokens[i], hf_tokens[i]) for i in range(args.batch))
  print(f"equality: ours and tunix greedy tokens identical ({args.batch} rows x {n} new "
        f"tokens); first new token's logits vs our full forward pass: tunix max |diff| "
        f"{np.abs(tunix_logits - ref_logits).max():.2e}, transformers "
        f"{np.abs(hf_logits - ref_logits).max():.2e} (scale {np.abs(ref_logits).max():.2f}); "
        f"transformers' tokens identical in {hf_rows}/{args.batch} rows")

  # Steady state. The machine's speed drifts, so the implementations alternate
  # and each figure is the median (and best) of `--repeats` runs.
  hf_gen(2)  # warm-up
  products, products_args = products_only(cfg, ours.params["llm"], args.batch)
  products(*products_args).block_until_ready()
  runs = {f"{who}_{k}": [] for who in ("ours", "tunix", "hf") for k in ("n", "1")}
  runs["bandwidth"], runs["products"] = [], []
  for _ in range(args.repeats):
    # The read bandwidth and the products-only step are measured in every
    # round, beside the runs they are compared with.
    runs["bandwidth"].append(read_bandwidth(repeats=10))
    runs["products"].append(float(np.median(
        [_time(lambda: products(*products_args).block_until_ready()) for _ in range(10)])))
    runs["ours_n"].append(_time(lambda: ours_gen(n)))
    runs["tunix_n"].append(_time(lambda: tunix_gen(n)))
    runs["hf_n"].append(_time(lambda: hf_gen(n)))
    runs["ours_1"].append(_time(lambda: ours_gen(1)))
    runs["tunix_1"].append(_time(lambda: tunix_gen(1)))
    runs["hf_1"].append(_time(lambda: hf_gen(1)))
  med = {k: float(np.median(x)) for k, x in runs.items()}
  best = {k: float(np.min(x)) for k, x in runs.items()}

  def tps(stat, who):
    dt = stat[f"{who}_n"] - stat[f"{who}_1"]
    return args.batch * (n - 1) / dt if dt > 0 else float("nan")

  # Our time per decoded token around positions 32 and 512: prefixes of that
  # length, (time for 64 new tokens - time for 32) / 32.
  per_token = {}
  block = prefix - args.prompt_len
  for pos in (32, 512):
    long_prompts = make_prompts(max(pos - block, 2))
    ours_gen(64, long_prompts)
    ours_gen(32, long_prompts)
    t64 = np.median([_time(lambda p=long_prompts: ours_gen(64, p)) for _ in range(3)])
    t32 = np.median([_time(lambda p=long_prompts: ours_gen(32, p)) for _ in range(3)])
    per_token[pos] = (t64 - t32) / 32

  # Read roofline: bytes one decode step reads / time per step / bandwidth
  # (the median of the bandwidths measured in the rounds).
  bandwidth = med["bandwidth"]
  text_len = bucket_length(prefix, sampler.length_bucket)
  w_bytes, kv_bytes = _decode_bytes(cfg, ours.params["llm"], sampler.cache_lengths(text_len, n),
                                    args.batch, sampler.cache_dtype.itemsize)
  t = cfg.text
  tunix_kv = t.depth * args.batch * (prefix + n) * 2 * t.num_kv_heads * t.head_dim * 4
  step = {who: (med[f"{who}_n"] - med[f"{who}_1"]) / (n - 1) for who in ("ours", "tunix")}
  ours_pct = 100 * (w_bytes + kv_bytes) / step["ours"] / (bandwidth * 1e9)
  products_pct = 100 * w_bytes / med["products"] / (bandwidth * 1e9)
  rounds_pct = [100 * (w_bytes + kv_bytes) * (n - 1) / (a - b) / (bw * 1e9)
                for a, b, bw in zip(runs["ours_n"], runs["ours_1"], runs["bandwidth"])]
  tunix_pct = 100 * (w_bytes + tunix_kv) / step["tunix"] / (bandwidth * 1e9)

  noisy = [name for who, name in (("ours", "ours"), ("tunix", "tunix"), ("hf", "transformers"))
           if not tps(med, who) > 0]
  if noisy:
    print(f"WARNING: {', '.join(noisy)}: {n} tokens took no longer than 1 token (a busy "
          "machine?); their tokens/s and ratios are nan; raise --repeats or --new-tokens")
  print(f"compile (includes one run): ours 1 token {compile_1:.1f}s, {n} tokens "
        f"{compile_n:.1f}s; tunix 1 token {tunix_compile_1:.1f}s, {n} tokens "
        f"{tunix_compile_n:.1f}s")
  for who, name in (("ours", "ours"), ("tunix", "tunix"), ("hf", "transformers")):
    print(f"{name + ':':13s} {tps(med, who):8.1f} decode tokens/s median, {tps(best, who):8.1f} "
          f"best ({n} new tokens: {med[f'{who}_n']:.3f}s, 1 token: {med[f'{who}_1']:.3f}s; "
          f"median of {args.repeats})")
  print(f"ours, time per decoded token (batch {args.batch}): position 32: "
        f"{per_token[32] * 1e3:.2f} ms, position 512: {per_token[512] * 1e3:.2f} ms "
        f"(ratio {per_token[512] / per_token[32]:.2f})")
  print(f"read bandwidth (jitted sum over 200 MB): {bandwidth:.1f} GB/s; a decode step "
        f"reads {w_bytes / 1e6:.1f} MB of weights + KV cache ours {kv_bytes / 1e6:.1f} MB "
        f"({step['ours'] * 1e3:.2f} ms/step), tunix {tunix_kv / 1e6:.1f} MB "
        f"({step['tunix'] * 1e3:.2f} ms/step, {tunix_pct:.0f}% of roofline)")
  print(f"read bandwidth per round: {', '.join(f'{b:.1f}' for b in runs['bandwidth'])} GB/s; "
        f"ours' read roofline per round: {', '.join(f'{p:.0f}%' for p in rounds_pct)}")
  print(f"matrix products alone (bench.sampling.products_only, the same weights, no "
        f"attention, norms, cache or sampling): {med['products'] * 1e3:.2f} ms/step, "
        f"{products_pct:.0f}% of the read roofline; ours' step takes "
        f"{step['ours'] / med['products']:.2f}x as long")
  print(f"speedup vs tunix: {tps(med, 'ours') / tps(med, 'tunix'):.2f}x")
  print(f"speedup vs transformers: {tps(med, 'ours') / tps(med, 'hf'):.2f}x")
  print(f"read roofline: {ours_pct:.0f}%")


if __name__ == "__main__":
  main()
