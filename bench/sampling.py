"""Decode throughput of our KV-cache sampler vs transformers' `generate`.

Both run the same ~50M-parameter PaliGemma 2-architecture model (same random
weights, float32), the same batch of 8 prompts, greedy, in one process on
this machine's CPU. Decode tokens/s excludes the prefill: it is measured as
(time to generate N tokens - time to generate 1 token) for both.

Also printed: time per decoded token around positions 32 and 512 (the cache
keeps a step's cost near flat in the position) and the compile times.

  python bench/sampling.py [--new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import jax
import numpy as np


def _config():
  from auditdm_jax.models import presets  # pylint: disable=import-outside-toplevel
  cfg = presets.tiny_paligemma2(vocab_size=32_000, width=512, depth=8, image_size=64,
                                patch_size=16, vision_width=256, vision_depth=4,
                                sliding_window=None)
  text = dataclasses.replace(cfg.text, num_heads=8, num_kv_heads=4, head_dim=64,
                             mlp_dim=2048)
  return cfg.replace(variant="bench-50m", text=text)


def _time(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt-len", type=int, default=16)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  import torch  # pylint: disable=import-outside-toplevel
  from auditdm_jax import models  # pylint: disable=import-outside-toplevel
  from auditdm_jax.models.ckpt import hf as hf_io  # pylint: disable=import-outside-toplevel
  from auditdm_jax.sampling import Sampler, SamplingParams  # pylint: disable=import-outside-toplevel
  from transformers import (PaliGemmaConfig,  # pylint: disable=import-outside-toplevel
                            PaliGemmaForConditionalGeneration)

  torch.set_num_threads(args.threads)
  cfg = _config()
  n_params = models.count_params(cfg)
  print(f"model: {cfg.variant}, {n_params / 1e6:.1f}M parameters; batch {args.batch}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({args.threads} threads)")

  # One set of random weights for both: build the HF model, load it into ours.
  hf_cfg = hf_io.hf_config_dict(cfg)
  hf_cfg["image_token_index"] = cfg.text.vocab_size - 1
  hf_model = PaliGemmaForConditionalGeneration(PaliGemmaConfig(**hf_cfg)).eval()
  with torch.no_grad():
    g = torch.Generator().manual_seed(0)
    for name, p in hf_model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * (0.2 if "norm" in name else 0.02))
  with tempfile.TemporaryDirectory() as d:
    hf_model.save_pretrained(d)
    ours = models.load(d)
  hf_model.config._attn_implementation = "eager"  # pylint: disable=protected-access

  rng = np.random.default_rng(0)
  s = cfg.vision.image_size
  images = rng.integers(0, 256, (args.batch, s, s, 3), dtype=np.uint8)
  prompts = [[2] + rng.integers(3, 30_000, args.prompt_len - 1).tolist()
             for _ in range(args.batch)]
  sampler = Sampler(ours)

  def ours_gen(n, prompts=prompts):
    sampler.sample(images, prompts, SamplingParams(n, temperature=0.0), stop_ids=[])

  n_img = cfg.num_image_tokens
  ids = torch.tensor([[hf_cfg["image_token_index"]] * n_img + p for p in prompts])
  pixels = torch.tensor(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)

  def hf_gen(n):
    with torch.no_grad():
      hf_model.generate(input_ids=ids, pixel_values=pixels,
                        token_type_ids=torch.zeros_like(ids), do_sample=False,
                        max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                        pad_token_id=0)

  # Compile times (first call per shape), then steady-state timings. The
  # machine's speed drifts, so the two implementations alternate and each
  # figure is the median of `--repeats` runs.
  n = args.new_tokens
  t0 = time.perf_counter()
  ours_gen(1)
  compile_1 = time.perf_counter() - t0
  t0 = time.perf_counter()
  ours_gen(n)
  compile_n = time.perf_counter() - t0
  hf_gen(2)  # warm-up
  runs = {"ours_n": [], "ours_1": [], "hf_n": [], "hf_1": []}
  for _ in range(args.repeats):
    runs["ours_n"].append(_time(lambda: ours_gen(n)))
    runs["hf_n"].append(_time(lambda: hf_gen(n)))
    runs["ours_1"].append(_time(lambda: ours_gen(1)))
    runs["hf_1"].append(_time(lambda: hf_gen(1)))
  med = {k: float(np.median(v)) for k, v in runs.items()}
  ours_tps = args.batch * (n - 1) / (med["ours_n"] - med["ours_1"])
  hf_tps = args.batch * (n - 1) / (med["hf_n"] - med["hf_1"])

  # Per-token decode time around positions 32 and 512: prefixes of that
  # length, (time for 64 new tokens - time for 32) / 32.
  per_token = {}
  for pos in (32, 512):
    text_len = pos - n_img
    long_prompts = [[2] + rng.integers(3, 30_000, text_len - 1).tolist()
                    for _ in range(args.batch)]
    ours_gen(64, long_prompts)
    ours_gen(32, long_prompts)
    t64 = np.median([_time(lambda p=long_prompts: ours_gen(64, p)) for _ in range(3)])
    t32 = np.median([_time(lambda p=long_prompts: ours_gen(32, p)) for _ in range(3)])
    per_token[pos] = (t64 - t32) / 32

  print(f"compile: prefill+decode for 1 token {compile_1:.1f}s, for {n} tokens "
        f"{compile_n:.1f}s (includes one run)")
  print(f"ours:         {ours_tps:8.1f} decode tokens/s  ({n} new tokens: "
        f"{med['ours_n']:.3f}s, 1 token: {med['ours_1']:.3f}s; median of {args.repeats})")
  print(f"transformers: {hf_tps:8.1f} decode tokens/s  ({n} new tokens: "
        f"{med['hf_n']:.3f}s, 1 token: {med['hf_1']:.3f}s; median of {args.repeats})")
  print(f"ours, time per decoded token (batch {args.batch}): position 32: "
        f"{per_token[32] * 1e3:.2f} ms, position 512: {per_token[512] * 1e3:.2f} ms "
        f"(ratio {per_token[512] / per_token[32]:.2f})")
  print(f"speedup vs transformers: {ours_tps / hf_tps:.2f}x")


if __name__ == "__main__":
  main()
