"""Real-size presets build abstractly and match the transformers parameter count."""

import pytest
import torch
from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, PaliGemmaConfig,
                          PaliGemmaForConditionalGeneration)

from auditdm_jax.models import count_params, presets
from auditdm_jax.models.ckpt import hf

# Hugging Face pads the vocabulary: PaliGemma 2 257152 -> 257216, Gemma 3
# 262144 -> 262208 (the image token and padding to a multiple of 64).
HF_VOCAB = {"paligemma": 257_216, "gemma3": 262_208}


def _hf_count(cfg) -> int:
  d = hf.hf_config_dict(cfg)
  d["text_config"]["vocab_size"] = HF_VOCAB[cfg.family]
  if cfg.family == "paligemma":
    d.update(vocab_size=HF_VOCAB["paligemma"], image_token_index=257_152)
    cls, conf = PaliGemmaForConditionalGeneration, PaliGemmaConfig
  else:
    cls, conf = Gemma3ForConditionalGeneration, Gemma3Config
  with torch.device("meta"):
    model = cls(conf(**d))
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(presets.real_presets()))
def test_param_count_equals_transformers_up_to_vocab_padding(name):
  cfg = presets.get_preset(name)
  ours = count_params(cfg)
  padding = (HF_VOCAB[cfg.family] - cfg.text.vocab_size) * cfg.text.width
  assert _hf_count(cfg) - padding == ours
  print(f"{name}: {ours:,d} parameters")


def test_published_sizes():
  approx = {"paligemma2-3b-224": 3.03e9, "paligemma2-10b-448": 9.66e9,
            "paligemma2-28b-896": 27.65e9, "gemma3-4b": 4.30e9, "gemma3-12b": 12.19e9,
            "gemma3-27b": 27.43e9}
  for name, n in approx.items():
    assert count_params(presets.get_preset(name)) == pytest.approx(n, rel=2e-3), name
  so400m = presets.siglip_so400m(224)
  assert (so400m.width, so400m.depth, so400m.mlp_dim, so400m.num_heads) == (1152, 27, 4304, 16)
  assert presets.gemma2_text("27b").query_scale == pytest.approx((4608 / 32) ** -0.5)
  assert presets.gemma3_text("27b").query_scale == pytest.approx((5376 / 32) ** -0.5)
  g3 = presets.gemma3_text("4b")
  assert g3.layer_types[:6] == ("local",) * 5 + ("global",) and g3.sliding_window == 1024
  assert (g3.rope_base_local, g3.rope_base_global, g3.rope_scale_global) == (1e4, 1e6, 8.0)
  for res, tokens in ((224, 256), (448, 1024), (896, 4096)):
    assert presets.paligemma2("3b", res).num_image_tokens == tokens
  assert presets.gemma3("4b").num_image_tokens == 256


def test_unknown_presets_are_rejected():
  with pytest.raises(ValueError, match="unknown preset"):
    presets.get_preset("paligemma2-7b-224")
  with pytest.raises(ValueError, match="resolution"):
    presets.paligemma2("3b", 300)
