"""Tiny random FLUX components built with diffusers / transformers (the
numerical reference; nothing is downloaded). One set of tiny configs shared by
every diffusion parity test, so the pipeline test composes exactly the pieces
the component tests check.

Shapes: the VAE has 2 levels (scale factor 2) and 4 latent channels, so a
packed latent token has 16 features = the transformer's `in_channels`; the
transformer's rope axes (4, 6, 6) sum to its head dim 16; both text encoders
have width 32 = the transformer's `joint_attention_dim` / `pooled_projection_dim`.
"""

from __future__ import annotations

import torch

VAE = dict(in_channels=3, out_channels=3,
           down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
           up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
           block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
           norm_num_groups=4, sample_size=32, scaling_factor=1.5035, shift_factor=0.0609,
           use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)

TRANSFORMER = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2,
                   num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(4, 6, 6))

CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)

T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16,
          feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _seeded(seed: int):
  torch.manual_seed(seed)


def transformer(seed: int = 0, **overrides):
  from diffusers import FluxTransformer2DModel  # pylint: disable=import-outside-toplevel
  _seeded(seed)
  model = FluxTransformer2DModel(**{**TRANSFORMER, **overrides}).eval()
  _randomize(model, seed)
  return model


def vae(seed: int = 0, **overrides):
  from diffusers import AutoencoderKL  # pylint: disable=import-outside-toplevel
  _seeded(seed)
  model = AutoencoderKL(**{**VAE, **overrides}).eval()
  _randomize(model, seed)
  return model


def clip_text(vocab_size: int, seed: int = 0, **overrides):
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=import-outside-toplevel
  _seeded(seed)
  model = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **{**CLIP, **overrides})).eval()
  _randomize(model, seed)
  return model


def t5_encoder(vocab_size: int, seed: int = 0, **overrides):
  from transformers import T5Config, T5EncoderModel  # pylint: disable=import-outside-toplevel
  _seeded(seed)
  model = T5EncoderModel(T5Config(vocab_size=vocab_size, **{**T5, **overrides})).eval()
  _randomize(model, seed)
  return model


def _randomize(model, seed: int, scale: float = 0.3):
  """Every parameter drawn at random (zero-initialised layers such as FLUX's
  output projections and adaptive norms would otherwise hide half the model
  from a parity test); norm scales stay near 1."""
  g = torch.Generator().manual_seed(10_000 + seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ("norm" in name or name.endswith("scale")) and "weight" in name:
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        fan = p.shape[-1] if p.ndim > 1 else 1
        s = scale if p.ndim == 1 else 1.0 / max(fan, 1) ** 0.5
        if p.ndim == 4:
          s = 1.0 / (p.shape[1] * p.shape[2] * p.shape[3]) ** 0.5
        p.copy_(s * torch.randn(p.shape, generator=g))


def save_pipeline(path: str, kontext: bool, seed: int = 0):
  """A whole tiny diffusers FluxPipeline / FluxKontextPipeline (tokenizers
  from tests/flux_tokenizer_files.py) saved under `path` with
  `save_pretrained`; returns the diffusers pipeline."""
  import os  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel
  from transformers import CLIPTokenizer, T5TokenizerFast  # pylint: disable=import-outside-toplevel
  from tests import flux_tokenizer_files as tok_files  # pylint: disable=import-outside-toplevel
  tdir, t2dir = os.path.join(path + ".tok"), os.path.join(path + ".tok2")
  vocab = tok_files.write_clip_tokenizer(tdir)
  vocab2 = tok_files.write_t5_tokenizer(t2dir)
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
      max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
  cls = diffusers.FluxKontextPipeline if kontext else diffusers.FluxPipeline
  pipe = cls(scheduler=scheduler, vae=vae(seed=seed + 3),
             text_encoder=clip_text(vocab, seed=seed + 4),
             tokenizer=CLIPTokenizer.from_pretrained(tdir),
             text_encoder_2=t5_encoder(vocab2, seed=seed + 5),
             tokenizer_2=T5TokenizerFast.from_pretrained(t2dir),
             transformer=transformer(seed=seed + 6))
  pipe.save_pretrained(path)
  return pipe
