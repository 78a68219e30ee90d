"""Model presets: PaliGemma 2 (3B/10B/28B at 224/448/896), Gemma 3 (4B/12B/27B)
and tiny CPU variants of both.

Sizes are the published ones (big_vision `ppp/gemma.py` for Gemma 2, the gemma
library for Gemma 3, So400m/14 for SigLIP). Two deliberate choices:

- PaliGemma 2 vocab is 257152 (256000 Gemma + 1024 <loc> + 128 <seg>), as in
  big_vision. The Hugging Face ports pad the table to 257216 rows (image
  token + padding to a multiple of 64); the parameter counts differ by
  64 * width for that reason only.
- Gemma 3 vocab is 262144 as in the official checkpoints; Hugging Face pads
  to 262208 (image soft token + padding): again 64 * width.
- PaliGemma 2 presets use no sliding window: big_vision, which trained them,
  runs every Gemma 2 layer with global attention. Hugging Face configs carry
  Gemma 2's window of 4096 on alternating layers, and loading a Hugging Face
  checkpoint keeps that; the two agree on every sequence shorter than 4096.
"""

from __future__ import annotations

import dataclasses

from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.gemma import GemmaConfig
from auditdm_jax.models.siglip import SigLIPConfig

PALIGEMMA_VOCAB = 257_152
GEMMA3_VOCAB = 262_144

# Gemma 3 special tokens (gemma library).
GEMMA3_BOI = 255_999
GEMMA3_EOI = 256_000
GEMMA3_IMAGE_TOKEN = 262_144  # placeholder; outside the embedding table
GEMMA3_DOUBLE_NEWLINE = 108

_GEMMA2 = {
    # size: width, depth, mlp_dim, heads, kv_heads, head_dim, query_pre_attn_scalar
    "2b": (2304, 26, 9216, 8, 4, 256, None),
    "9b": (3584, 42, 14336, 16, 8, 256, None),
    "27b": (4608, 46, 36864, 32, 16, 128, 4608 // 32),
}
_PALIGEMMA2_LLM = {"3b": "2b", "10b": "9b", "28b": "27b"}

_GEMMA3 = {
    "4b": (2560, 34, 10240, 8, 4, 256, None),
    "12b": (3840, 48, 15360, 16, 8, 256, None),
    "27b": (5376, 62, 21504, 32, 16, 128, 5376 // 32),
}


def siglip_so400m(image_size: int, out_dim: int | None = None) -> SigLIPConfig:
  return SigLIPConfig(image_size=image_size, patch_size=14, width=1152, depth=27,
                      mlp_dim=4304, num_heads=16, out_dim=out_dim)


def gemma2_text(size: str, vocab_size: int = PALIGEMMA_VOCAB,
                sliding_window: int | None = None) -> GemmaConfig:
  if size not in _GEMMA2:
    raise ValueError(f"unknown Gemma 2 size {size!r}; known: {sorted(_GEMMA2)}")
  w, l, f, n, k, h, qs = _GEMMA2[size]
  return GemmaConfig(
      width=w, depth=l, mlp_dim=f, num_heads=n, num_kv_heads=k, head_dim=h,
      vocab_size=vocab_size, post_norms=True, query_pre_attn_scalar=qs,
      attn_logits_softcap=50.0, final_logits_softcap=30.0,
      attention_pattern=("local", "global") if sliding_window else ("global",),
      sliding_window=sliding_window)


def gemma3_text(size: str, vision_proj_dim: int | None = 1152) -> GemmaConfig:
  if size not in _GEMMA3:
    raise ValueError(f"unknown Gemma 3 size {size!r}; known: {sorted(_GEMMA3)}")
  w, l, f, n, k, h, qs = _GEMMA3[size]
  return GemmaConfig(
      width=w, depth=l, mlp_dim=f, num_heads=n, num_kv_heads=k, head_dim=h,
      vocab_size=GEMMA3_VOCAB, post_norms=True, qk_norm=True,
      query_pre_attn_scalar=qs, attention_pattern=("local",) * 5 + ("global",),
      sliding_window=1024, rope_base_local=10_000.0, rope_base_global=1_000_000.0,
      rope_scale_global=8.0, vision_proj_dim=vision_proj_dim)


def paligemma2(size: str = "3b", res: int = 224) -> VLMConfig:
  if size not in _PALIGEMMA2_LLM:
    raise ValueError(f"unknown PaliGemma 2 size {size!r}; known: {sorted(_PALIGEMMA2_LLM)}")
  if res not in (224, 448, 896):
    raise ValueError(f"PaliGemma 2 resolution must be 224, 448 or 896, got {res}")
  text = gemma2_text(_PALIGEMMA2_LLM[size])
  return VLMConfig(family="paligemma", variant=f"paligemma2-{size}-{res}",
                   vision=siglip_so400m(res, out_dim=text.width), text=text)


def gemma3(size: str = "4b") -> VLMConfig:
  return VLMConfig(
      family="gemma3", variant=f"gemma3-{size}", vision=siglip_so400m(896),
      text=gemma3_text(size), mm_tokens_per_image=256, boi_id=GEMMA3_BOI,
      eoi_id=GEMMA3_EOI, image_token_id=GEMMA3_IMAGE_TOKEN,
      image_wrap_id=GEMMA3_DOUBLE_NEWLINE)


def tiny_siglip(image_size: int = 32, patch_size: int = 8, width: int = 32,
                depth: int = 2, out_dim: int | None = None) -> SigLIPConfig:
  return SigLIPConfig(image_size=image_size, patch_size=patch_size, width=width,
                      depth=depth, mlp_dim=2 * width, num_heads=2, out_dim=out_dim)


def tiny_paligemma2(vocab_size: int = 512, width: int = 64, depth: int = 4,
                    image_size: int = 32, patch_size: int = 8,
                    vision_width: int = 32, vision_depth: int = 2,
                    sliding_window: int | None = 32, **text_kw) -> VLMConfig:
  """A PaliGemma 2-architecture model small enough to train on a laptop CPU."""
  text = GemmaConfig(
      width=width, depth=depth, mlp_dim=2 * width, num_heads=4, num_kv_heads=2,
      head_dim=width // 4, vocab_size=vocab_size, post_norms=True,
      attn_logits_softcap=50.0, final_logits_softcap=30.0,
      attention_pattern=("local", "global") if sliding_window else ("global",),
      sliding_window=sliding_window)
  text = dataclasses.replace(text, **text_kw)
  return VLMConfig(family="paligemma", variant="tiny-paligemma2",
                   vision=tiny_siglip(image_size, patch_size, vision_width,
                                      vision_depth, out_dim=width),
                   text=text)


def tiny_gemma3(vocab_size: int = 512, width: int = 64, depth: int = 6,
                image_size: int = 32, patch_size: int = 8,
                vision_width: int = 32, vision_depth: int = 2,
                mm_tokens_per_image: int = 4, sliding_window: int = 16,
                boi_id: int | None = None, eoi_id: int | None = None,
                image_token_id: int | None = None,
                image_wrap_id: int | None = None, **text_kw) -> VLMConfig:
  """A Gemma 3-architecture VLM for CPU. Special ids default to the last ids of
  the vocabulary (placeholder = vocab_size, outside the table, as in Gemma 3)."""
  text = GemmaConfig(
      width=width, depth=depth, mlp_dim=2 * width, num_heads=4, num_kv_heads=2,
      head_dim=width // 4, vocab_size=vocab_size, post_norms=True, qk_norm=True,
      attention_pattern=("local",) * 5 + ("global",), sliding_window=sliding_window,
      rope_base_local=10_000.0, rope_base_global=1_000_000.0,
      rope_scale_global=8.0, vision_proj_dim=vision_width)
  text = dataclasses.replace(text, **text_kw)
  return VLMConfig(
      family="gemma3", variant="tiny-gemma3",
      vision=tiny_siglip(image_size, patch_size, vision_width, vision_depth),
      text=text, mm_tokens_per_image=mm_tokens_per_image,
      boi_id=vocab_size - 2 if boi_id is None else boi_id,
      eoi_id=vocab_size - 1 if eoi_id is None else eoi_id,
      image_token_id=vocab_size if image_token_id is None else image_token_id,
      image_wrap_id=image_wrap_id)


# The scene world (auditdm_jax/scenes): 48 px images of a 3x3 grid of 16 px
# cells, one patch per cell, fixed sin-cos position embeddings, a 448-piece
# world tokenizer whose Gemma 3 image ids are 6 and 7. Sizes: widths of the
# LLM (the vision tower is shared between sizes so targets can be derived
# from one base model). Measured learnability: docs/scene_world.md.
SCENE = {
    # name: (llm width, llm depth, heads)
    "small": (64, 2, 4),
    "large": (64, 4, 4),
}
SCENE_VISION = dict(image_size=48, patch_size=16, width=64, depth=2)
SCENE_VOCAB = 512


def scene_siglip(out_dim: int | None) -> SigLIPConfig:
  v = SCENE_VISION
  return SigLIPConfig(image_size=v["image_size"], patch_size=v["patch_size"],
                      width=v["width"], depth=v["depth"], mlp_dim=4 * v["width"],
                      num_heads=4, out_dim=out_dim, posemb="sincos2d",
                      scan_unroll=v["depth"])


def scene_paligemma2(size: str = "large") -> VLMConfig:
  """PaliGemma 2 architecture (Gemma 2 LLM, prefix-LM) for the scene world."""
  if size not in SCENE:
    raise ValueError(f"unknown scene size {size!r}; known: {sorted(SCENE)}")
  w, d, n = SCENE[size]
  text = GemmaConfig(
      width=w, depth=d, mlp_dim=4 * w, num_heads=n, num_kv_heads=n, head_dim=w // n,
      vocab_size=SCENE_VOCAB, post_norms=True, attn_logits_softcap=50.0,
      final_logits_softcap=30.0, attention_pattern=("global",), scan_unroll=d)
  return VLMConfig(family="paligemma", variant=f"scene-paligemma2-{size}",
                   vision=scene_siglip(out_dim=w), text=text)


def scene_gemma3(width: int = 96, depth: int = 4) -> VLMConfig:
  """Gemma 3 architecture (the auditor) for the scene world: one soft token
  per grid cell, image ids of the world tokenizer."""
  n = 4
  text = GemmaConfig(
      width=width, depth=depth, mlp_dim=4 * width, num_heads=n, num_kv_heads=n,
      head_dim=width // n, vocab_size=SCENE_VOCAB, post_norms=True, qk_norm=True,
      attention_pattern=("local",) * 5 + ("global",), sliding_window=64,
      rope_base_local=10_000.0, rope_base_global=1_000_000.0, rope_scale_global=8.0,
      vision_proj_dim=SCENE_VISION["width"], scan_unroll=depth)
  return VLMConfig(family="gemma3", variant="scene-gemma3", vision=scene_siglip(None),
                   text=text, mm_tokens_per_image=9, boi_id=6, eoi_id=7,
                   image_token_id=SCENE_VOCAB, image_wrap_id=None)


def scene_presets() -> dict[str, VLMConfig]:
  out = {f"scene-paligemma2-{s}": scene_paligemma2(s) for s in SCENE}
  out["scene-gemma3"] = scene_gemma3()
  return out


def real_presets() -> dict[str, VLMConfig]:
  """Every published-size preset, by name."""
  out = {}
  for size in _PALIGEMMA2_LLM:
    for res in (224, 448, 896):
      out[f"paligemma2-{size}-{res}"] = paligemma2(size, res)
  for size in _GEMMA3:
    out[f"gemma3-{size}"] = gemma3(size)
  return out


def get_preset(name: str) -> VLMConfig:
  """'paligemma2-3b-224', 'gemma3-4b', 'tiny-paligemma2', 'tiny-gemma3'."""
  if name == "tiny-paligemma2":
    return tiny_paligemma2()
  if name == "tiny-gemma3":
    return tiny_gemma3()
  presets = {**real_presets(), **scene_presets()}
  if name not in presets:
    raise ValueError(f"unknown preset {name!r}; known: "
                     f"{sorted(presets) + ['tiny-gemma3', 'tiny-paligemma2']}")
  return presets[name]
