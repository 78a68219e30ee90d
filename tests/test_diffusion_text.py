"""FLUX's text encoders (T5 v1.1, CLIP-L text) and tokenizers against
transformers, on tiny random models and tiny real tokenizer files."""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from auditdm_jax.diffusion import text
from auditdm_jax.diffusion.ckpt import text as text_ckpt
from auditdm_jax.diffusion.common import CheckpointError
from auditdm_jax.diffusion.tokenizers import ClipTokenizer, T5Tokenizer
from tests import flux_reference as ref
from tests.flux_tokenizer_files import write_clip_tokenizer, write_t5_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4

STRINGS = [
    "a cat", "A Cat", "THE DOG AND THE CAT", "a photo of a cat sitting on the window",
    "Hello, world!", "hello world...", "what?!?!", "(parentheses) [brackets] {braces}",
    "it's the cat's toy; they're here, we've gone, I'm ok, you'll see, he'd go",
    "IT'S LOUD", "don't", "  leading spaces", "trailing spaces   ", "many    spaces   between",
    "tabs\tand\nnewlines\r\nhere", "\u00a0non-breaking\u00a0space", "ideographic\u3000space",
    "café crème brûlée", "naïve façade", "Ünïcödé", "日本語のテキスト", "中文 混合 English",
    "emoji 🐱🐶 party 🎉", "Ελληνικά κείμενο", "русский текст", "עברית", "العربية",
    "digits 1234567890", "3.14159 and 2,718", "1st 2nd 3rd 4th", "x=y+z*2^3",
    "email me@example.com", "https://example.com/path?q=1&r=2", "#hashtag @mention",
    "a-b_c~d`e|f\\g/h", "quotes \"double\" and 'single' and `back`", "ellipsis… dash — en–dash",
    "ﬁ ligature ﬀ", "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "x", "!", ".", "a b c d e f g",
    "the " * 60, "a photo of a red square " * 12, "supercalifragilisticexpialidocious " * 8,
    "<|endoftext|> inside", "<|ENDOFTEXT|> upper", "a<|startoftext|>b", "</s> eos inside",
    "<extra_id_0> sentinel <extra_id_10>x<extra_id_1>", "<pad><unk>", "Number 42, size 7x11!",
    "zero\u200bwidth", "combining e\u0301 and Ⅰ\u0301", "\u2028line sep\u0085nel",
    "mixed\u2003em space", "lit\u2581eral \u2581\u2581 x\u2581", "og\u1680ham\u2029p\u202fm\x0bv\x0c",
]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("flux_text")
  clip_v = write_clip_tokenizer(root / "tokenizer")
  t5_v = write_t5_tokenizer(root / "tokenizer_2")
  return root, clip_v, t5_v


@pytest.fixture(scope="module")
def t5_ref(dirs):
  root, _, t5_v = dirs
  model = ref.t5_encoder(t5_v)
  path = root / "text_encoder_2"
  model.save_pretrained(path)
  return model, str(path)


@pytest.fixture(scope="module")
def clip_ref(dirs):
  root, clip_v, _ = dirs
  model = ref.clip_text(clip_v)
  path = root / "text_encoder"
  model.save_pretrained(path)
  return model, str(path)


def _state(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _t5_ids(dirs, length=40):
  tok = T5Tokenizer(str(dirs[0] / "tokenizer_2"))
  return tok(["A cat sits on the window, 4k photograph.",
              "the dog " * 30,                    # truncated: fills the whole row
              "x"], length)


def _clip_ids(dirs):
  tok = ClipTokenizer(str(dirs[0] / "tokenizer"))
  return tok(["a photo of a red square", "the cat and the dog " * 20, "hello world"])


# --------------------------------------------------------------------------- T5
def test_t5_matches_transformers(dirs, t5_ref):
  model, path = t5_ref
  ids = _t5_ids(dirs)
  assert (ids == 0).any() and ids.shape == (3, 40)       # padded rows, a full row
  enc = text_ckpt.load_t5(path, dtype="float32")
  ours = enc(ids)
  with torch.no_grad():
    want = model(torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
  err = float(np.abs(ours - want).max())
  print(f"T5 encoder max abs diff {err:.3g} (output max {np.abs(want).max():.3g})")
  assert ours.dtype == np.float32 and ours.shape == want.shape
  assert err <= TOL


def test_t5_no_attention_mask_like_flux(dirs, t5_ref):
  """Padding changes the encodings of real tokens, since FLUX passes no mask
  (so must we); the pipeline's own call reproduces that."""
  model, path = t5_ref
  ids = _t5_ids(dirs, length=24)
  enc = text_ckpt.load_t5(path, dtype="float32")
  short = enc(ids[:, :12])
  assert np.abs(enc(ids)[:, :12] - short).max() > 1e-3
  with torch.no_grad():
    unmasked = model(torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
  assert np.abs(enc(ids) - unmasked).max() <= TOL


def test_t5_sharded_checkpoint_and_jit(dirs, t5_ref, tmp_path):
  model, path = t5_ref
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  enc = text_ckpt.load_t5(str(tmp_path), dtype="float32")
  ids = _t5_ids(dirs)
  np.testing.assert_array_equal(enc(ids), text_ckpt.load_t5(path, "float32")(ids))
  fn = jax.jit(text.t5_encode, static_argnums=1)
  out = np.asarray(fn(enc.params, enc.cfg, ids))
  assert np.abs(out - enc(ids)).max() <= 1e-5


def test_t5_bfloat16_close_to_float32(dirs, t5_ref):
  """bfloat16 (the default) errs from float32 no more than transformers'
  own bfloat16 model does."""
  model, path = t5_ref
  ids = _t5_ids(dirs)
  f32 = text_ckpt.load_t5(path, "float32")(ids)
  ours16 = text_ckpt.load_t5(path)
  assert ours16.cfg.dtype == "bfloat16"
  bf16 = ours16(ids)
  with torch.no_grad():
    torch16 = ref.t5_encoder(dirs[2]).to(torch.bfloat16)(
        torch.tensor(ids, dtype=torch.long)).last_hidden_state.float().numpy()
  scale = np.abs(f32).max()
  ours_rel, torch_rel = np.abs(bf16 - f32).max() / scale, np.abs(torch16 - f32).max() / scale
  print(f"T5 bfloat16 vs float32 (max abs diff / max): ours {ours_rel:.3g}, "
        f"transformers {torch_rel:.3g}")
  assert bf16.dtype == np.float32 and ours_rel <= 1.5 * torch_rel + 1e-3 and ours_rel < 0.08


def test_t5_config_from_hf(t5_ref):
  _, path = t5_ref
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    d = json.load(f)
  cfg = text.T5Config.from_hf(d, "float32")
  assert (cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads) == (32, 8, 37, 2, 4)
  assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (8, 16)
  for bad in ("relu", "gated-silu", "gelu"):
    with pytest.raises(ValueError, match="feed_forward_proj"):
      text.T5Config.from_hf({**d, "feed_forward_proj": bad})
  with pytest.raises(ValueError, match="d_model"):
    text.T5Config.from_hf({k: v for k, v in d.items() if k != "d_model"})
  assert text.T5_XXL == text.T5Config() and text.T5_XXL.inner_dim == 4096


def test_t5_init_has_the_loaded_layout(t5_ref):
  _, path = t5_ref
  enc = text_ckpt.load_t5(path, "float32")
  init = text.t5_init(enc.cfg, jax.random.PRNGKey(0))
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, enc.params)
  out = text.t5_encode(init, enc.cfg, np.zeros((2, 5), np.int32))
  assert out.shape == (2, 5, 32) and np.isfinite(np.asarray(out)).all()


def test_t5_relative_buckets_match_transformers():
  # pylint: disable=import-outside-toplevel,protected-access
  from transformers.models.t5.modeling_t5 import T5Attention
  for n, buckets, dist in ((512, 32, 128), (70, 8, 16)):
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    want = T5Attention._relative_position_bucket(rel, True, buckets, dist).numpy()
    np.testing.assert_array_equal(text.relative_position_buckets(n, n, buckets, dist), want)


# --------------------------------------------------------------------------- CLIP
def test_clip_matches_transformers(dirs, clip_ref):
  model, path = clip_ref
  ids = _clip_ids(dirs)
  assert ids.shape == (3, 77)
  clip = text_ckpt.load_clip(path, dtype="float32")
  hidden, pooled = clip(ids)
  with torch.no_grad():
    out = model(torch.tensor(ids, dtype=torch.long))
  h_err = float(np.abs(hidden - out.last_hidden_state.numpy()).max())
  p_err = float(np.abs(pooled - out.pooler_output.numpy()).max())
  print(f"CLIP text max abs diff: last hidden {h_err:.3g}, pooled {p_err:.3g}")
  assert hidden.shape == (3, 77, 32) and pooled.shape == (3, 32)
  assert h_err <= TOL and p_err <= TOL


def test_clip_pooling_rules(dirs):
  """eos_token_id 2: the largest id's position; otherwise the first eos."""
  _, clip_v, _ = dirs
  eos = clip_v - 1
  ids = np.array([[clip_v - 2, 5, 9, eos, eos, eos],
                  [clip_v - 2, 7, eos, 3, eos, eos],
                  [clip_v - 2, 1, 2, 3, 4, eos]])
  for eos_id in (2, eos):
    model = ref.clip_text(clip_v, eos_token_id=eos_id)
    cfg = text.ClipTextConfig.from_hf(model.config.to_dict(), "float32")
    assert cfg.eos_token_id == eos_id
    clip = text.ClipText(cfg, text_ckpt.clip_params_from_hf(_state(model), cfg))
    _, pooled = clip(ids)
    with torch.no_grad():
      want = model(torch.tensor(ids)).pooler_output.numpy()
    assert np.abs(pooled - want).max() <= TOL
  ids2 = np.array([[4, 9, 3, 1]])
  np.testing.assert_array_equal(np.asarray(text.clip_pool_positions(ids2, 2)), [1])
  np.testing.assert_array_equal(np.asarray(text.clip_pool_positions(ids2, 3)), [2])


def test_clip_transformers4_prefix_and_sharded(dirs, clip_ref, tmp_path):
  """FLUX's text_encoder/ (transformers 4) names keys `text_model.…` and may
  hold the position_ids buffer; a sharded save loads too."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  model, path = clip_ref
  sd = {"text_model." + k: v for k, v in _state(model).items()}
  sd["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  old = tmp_path / "old"
  old.mkdir()
  save_file(sd, str(old / "model.safetensors"))
  shutil.copy(os.path.join(path, "config.json"), old / "config.json")
  ids = _clip_ids(dirs)
  want = text_ckpt.load_clip(path, "float32")(ids)
  got = text_ckpt.load_clip(str(old), "float32")(ids)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  got = text_ckpt.load_clip(str(tmp_path / "sharded"), "float32")(ids)
  np.testing.assert_array_equal(got[1], want[1])


def test_clip_bfloat16_and_init(dirs, clip_ref):
  _, path = clip_ref
  ids = _clip_ids(dirs)
  f32 = text_ckpt.load_clip(path, "float32")
  bf16 = text_ckpt.load_clip(path)
  assert bf16.cfg.dtype == "bfloat16"
  (h32, p32), (h16, p16) = f32(ids), bf16(ids)
  with torch.no_grad():
    t16 = ref.clip_text(dirs[1]).to(torch.bfloat16)(torch.tensor(ids, dtype=torch.long))
  t16 = (t16.last_hidden_state.float().numpy(), t16.pooler_output.float().numpy())
  for name, ours, theirs, want in (("hidden", h16, t16[0], h32), ("pooled", p16, t16[1], p32)):
    ours_rel = np.abs(ours - want).max() / np.abs(want).max()
    torch_rel = np.abs(theirs - want).max() / np.abs(want).max()
    print(f"CLIP {name} bfloat16 vs float32 (max abs diff / max): ours {ours_rel:.3g}, "
          f"transformers {torch_rel:.3g}")
    assert ours_rel <= 1.5 * torch_rel + 1e-3 and ours_rel < 0.05
  init = text.clip_init(f32.cfg, jax.random.PRNGKey(0))
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, f32.params)
  fn = jax.jit(text.clip_encode, static_argnums=1)
  h, p = fn(f32.params, f32.cfg, ids)
  assert np.abs(np.asarray(p) - p32).max() <= 1e-5 and h.shape == (3, 77, 32)
  assert text.CLIP_L == text.ClipTextConfig() and text.CLIP_L.eos_token_id == 2


# --------------------------------------------------------------------------- tokenizers
def test_t5_tokenizer_matches_transformers(dirs):
  root = dirs[0]
  theirs = transformers.T5TokenizerFast.from_pretrained(str(root / "tokenizer_2"))
  ours = T5Tokenizer(str(root / "tokenizer_2"))
  assert ours.vocab_size == len(theirs) == dirs[2]
  for length in (512, 24):
    want = theirs(STRINGS, padding="max_length", max_length=length, truncation=True,
                  return_tensors="np").input_ids
    got = ours(STRINGS, length)
    assert got.dtype == np.int32 and got.shape == (len(STRINGS), length)
    bad = [s for s, g, w in zip(STRINGS, got, want) if (g != w).any()]
    assert not bad, bad
  # The .model file itself works too.
  np.testing.assert_array_equal(T5Tokenizer(str(root / "tokenizer_2" / "spiece.model"))(
      STRINGS[:5], 16), ours(STRINGS[:5], 16))


def test_clip_tokenizer_matches_transformers(dirs):
  root = dirs[0]
  theirs = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
  ours = ClipTokenizer(str(root / "tokenizer"))
  assert ours.max_length == 77 and ours.pad_id == theirs.pad_token_id == dirs[1] - 1
  assert ours.vocab_size == len(theirs) == dirs[1]
  want = theirs(STRINGS, padding="max_length", max_length=77, truncation=True,
                return_tensors="np").input_ids
  got = ours(STRINGS)
  assert got.dtype == np.int32 and got.shape == (len(STRINGS), 77)
  bad = [s for s, g, w in zip(STRINGS, got, want) if (g != w).any()]
  assert not bad, bad
  short = ours(STRINGS, max_length=10)
  want = theirs(STRINGS, padding="max_length", max_length=10, truncation=True,
                return_tensors="np").input_ids
  np.testing.assert_array_equal(short, want)


def test_clip_tokenizer_from_tokenizer_json(dirs, tmp_path):
  """A directory with only tokenizer.json (as transformers saves it)."""
  theirs = transformers.CLIPTokenizer.from_pretrained(str(dirs[0] / "tokenizer"))
  theirs.save_pretrained(tmp_path)
  for name in ("vocab.json", "merges.txt"):
    if os.path.exists(tmp_path / name):
      os.remove(tmp_path / name)
  assert os.path.isfile(tmp_path / "tokenizer.json")
  ours = ClipTokenizer(str(tmp_path))
  want = theirs(STRINGS, padding="max_length", max_length=77, truncation=True,
                return_tensors="np").input_ids
  np.testing.assert_array_equal(ours(STRINGS), want)


def test_t5_tokenizer_from_tokenizer_json(dirs, tmp_path):
  """transformers 5's save_pretrained writes tokenizer.json and no spiece.model
  (a pipeline saved by diffusers has such a tokenizer_2/)."""
  theirs = transformers.T5TokenizerFast.from_pretrained(str(dirs[0] / "tokenizer_2"))
  theirs.save_pretrained(tmp_path)
  assert not os.path.exists(tmp_path / "spiece.model")
  ours = T5Tokenizer(str(tmp_path))
  assert ours.sp is None and ours.vocab_size == dirs[2]
  want = theirs(STRINGS, padding="max_length", max_length=40, truncation=True,
                return_tensors="np").input_ids
  np.testing.assert_array_equal(ours(STRINGS, 40), want)


def test_flux_encode_prompt_matches_diffusers(dirs, t5_ref, clip_ref):
  """Prompt -> (T5 embeddings, CLIP pooled) as FluxPipeline.encode_prompt."""
  from diffusers import FluxPipeline  # pylint: disable=import-outside-toplevel
  root = dirs[0]
  pipe = FluxPipeline(
      scheduler=None, vae=None, transformer=None, text_encoder=clip_ref[0],
      tokenizer=transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
      text_encoder_2=t5_ref[0],
      tokenizer_2=transformers.T5TokenizerFast.from_pretrained(str(root / "tokenizer_2")))
  prompts = ["A cat sits on the window, 4k photograph.", "the dog " * 30, "Ünïcödé x"]
  with torch.no_grad():
    want_t5, want_pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=48)
  clip_ids = ClipTokenizer(str(root / "tokenizer"))(prompts)
  _, pooled = text_ckpt.load_clip(clip_ref[1], "float32")(clip_ids)
  t5 = text_ckpt.load_t5(t5_ref[1], "float32")(T5Tokenizer(str(root / "tokenizer_2"))(prompts, 48))
  print(f"FLUX encode_prompt max abs diff: T5 {np.abs(t5 - want_t5.numpy()).max():.3g}, "
        f"pooled {np.abs(pooled - want_pooled.numpy()).max():.3g}")
  assert np.abs(t5 - want_t5.numpy()).max() <= TOL
  assert np.abs(pooled - want_pooled.numpy()).max() <= TOL


def test_truncation_is_logged(dirs, caplog):
  root = dirs[0]
  with caplog.at_level(logging.WARNING):
    ids = ClipTokenizer(str(root / "tokenizer"))(["the cat " * 100])
  assert ids.shape == (1, 77) and ids[0, -1] == dirs[1] - 1 and "truncated" in caplog.text
  ids = T5Tokenizer(str(root / "tokenizer_2"))(["the cat " * 100], 8)
  assert ids.shape == (1, 8) and ids[0, -1] == 1


def test_tokenizer_errors(dirs, tmp_path):
  root = dirs[0]
  clip, t5 = ClipTokenizer(str(root / "tokenizer")), T5Tokenizer(str(root / "tokenizer_2"))
  for tok, call in ((clip, lambda t: clip(t)), (t5, lambda t: t5(t, 16))):
    with pytest.raises(ValueError, match="text 1 is empty"):
      call(["a cat", ""])
    with pytest.raises(ValueError, match="text 2 is a int"):
      call(["a", "b", 3])
    with pytest.raises(ValueError, match="sequence of strings"):
      call([])
  with pytest.raises(ValueError, match="max_length"):
    t5(["a"], 0)
  with pytest.raises(ValueError, match="max_length"):
    clip(["a"], max_length=1)
  with pytest.raises(ValueError, match="spiece.model"):
    T5Tokenizer(str(tmp_path))
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a sentencepiece model"):
    T5Tokenizer(str(tmp_path / "bad.model"))
  partial = tmp_path / "clip"
  shutil.copytree(root / "tokenizer", partial)
  os.remove(partial / "merges.txt")
  with pytest.raises(ValueError, match="merges.txt"):
    ClipTokenizer(str(partial))
  os.remove(partial / "vocab.json")
  with pytest.raises(ValueError, match="vocab.json"):
    ClipTokenizer(str(partial))


# --------------------------------------------------------------------------- errors
def test_checkpoint_errors_name_the_key(t5_ref, clip_ref):
  t5_model, t5_path = t5_ref
  cfg = text_ckpt.load_t5(t5_path, "float32").cfg
  sd = _state(t5_model)
  sd["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(CheckpointError, match="unknown key 'encoder.block.0.layer.0.SelfAttention"
                                            ".extra.weight'"):
    text_ckpt.t5_params_from_hf(sd, cfg, "t5-src")
  sd = _state(t5_model)
  del sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  with pytest.raises(CheckpointError, match="missing key 'encoder.block.1.layer.1.DenseReluDense"):
    text_ckpt.t5_params_from_hf(sd, cfg, "t5-src")
  sd = _state(t5_model)
  sd["encoder.final_layer_norm.weight"] = np.ones((31,), np.float32)
  with pytest.raises(CheckpointError, match=r"encoder.final_layer_norm.weight.*\(31,\).*\(32,\)"):
    text_ckpt.t5_params_from_hf(sd, cfg, "t5-src")
  # T5 with only the tied copy of the embedding still loads.
  sd = _state(t5_model)
  del sd["shared.weight"]
  text_ckpt.t5_params_from_hf(sd, cfg, "t5-src")
  big = text.T5Config.from_hf({**t5_model.config.to_dict(), "num_layers": 3}, "float32")
  with pytest.raises(CheckpointError, match="missing key 'encoder.block.2"):
    text_ckpt.t5_params_from_hf(_state(t5_model), big, "t5-src")

  clip_model, clip_path = clip_ref
  ccfg = text_ckpt.load_clip(clip_path, "float32").cfg
  sd = _state(clip_model)
  sd["text_projection.weight"] = np.zeros((32, 32), np.float32)
  with pytest.raises(CheckpointError, match="unknown key 'text_projection.weight'"):
    text_ckpt.clip_params_from_hf(sd, ccfg, "clip-src")
  sd = _state(clip_model)
  sd["embeddings.token_embedding.weight"] = sd["embeddings.token_embedding.weight"][:-1]
  with pytest.raises(CheckpointError, match="(?s)clip-src.*token_embedding.weight.*569"):
    text_ckpt.clip_params_from_hf(sd, ccfg, "clip-src")
  sd = _state(clip_model)
  del sd["final_layer_norm.bias"]
  with pytest.raises(CheckpointError, match="missing key 'final_layer_norm.bias'"):
    text_ckpt.clip_params_from_hf(sd, ccfg, "clip-src")


def test_bad_ids_are_errors(t5_ref, clip_ref, dirs):
  t5 = text_ckpt.load_t5(t5_ref[1], "float32")
  clip = text_ckpt.load_clip(clip_ref[1], "float32")
  t5_v, clip_v = dirs[2], dirs[1]
  with pytest.raises(ValueError, match=f"token id {t5_v} is outside"):
    t5(np.array([[1, t5_v]]))
  with pytest.raises(ValueError, match="token id -1 is outside"):
    clip(np.array([[0, -1]]))
  with pytest.raises(ValueError, match=f"token id {clip_v} is outside"):
    text.clip_encode(clip.params, clip.cfg, np.array([[clip_v]]))
  with pytest.raises(ValueError, match="shape"):
    t5(np.array([1, 2, 3]))
  with pytest.raises(ValueError, match="integer"):
    clip(np.zeros((1, 3), np.float32))
  with pytest.raises(ValueError, match="exceeds max_position_embeddings 77"):
    clip(np.zeros((1, 78), np.int32))


def test_config_validation(clip_ref):
  with pytest.raises(ValueError, match="multiple of num_heads"):
    text.ClipTextConfig(hidden_size=30, num_heads=4)
  with pytest.raises(ValueError, match="hidden_act"):
    text.ClipTextConfig(hidden_act="relu")
  with pytest.raises(ValueError, match="d_model"):
    text.T5Config(d_model=0)
  with pytest.raises(ValueError, match="dtype"):
    text.T5Config(dtype="float16")
  with open(os.path.join(clip_ref[1], "config.json"), encoding="utf-8") as f:
    d = json.load(f)
  with pytest.raises(ValueError, match="hidden_act"):
    text.ClipTextConfig.from_hf({**d, "hidden_act": "relu"})
  with pytest.raises(ValueError, match="dtype"):
    text.ClipTextConfig.from_hf(d, dtype="int8")
  with pytest.raises(CheckpointError, match="config.json"):
    text_ckpt.load_clip(os.path.dirname(clip_ref[1]) + "/nowhere")
