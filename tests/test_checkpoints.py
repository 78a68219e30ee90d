"""Checkpoint I/O: round trips between formats and bad-input handling."""

import dataclasses
import json
import os

import flax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from auditdm_jax import models
from auditdm_jax.models import presets
from auditdm_jax.models.ckpt import CheckpointError, detect_format, npz, orbax_io
from auditdm_jax.models.ckpt.common import BFLOAT16


def _flat(params):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


def assert_same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture
def hf_pg_dir(hf_pg):
  return hf_pg[1]


@pytest.fixture
def hf_g3_dir(hf_g3):
  return hf_g3[1]


@pytest.fixture
def pg(hf_pg):
  return hf_pg[2]


# ---------------------------------------------------------------------------
# Round trips.
# ---------------------------------------------------------------------------


def test_hf_to_npz_to_ours_identical(pg, tmp_path):
  path = str(tmp_path / "pg.npz")
  pg.export_npz(path)
  assert detect_format(path) == "bv_npz"
  back = models.load(path, config=pg.config)
  assert_same_params(pg.params, back.params)
  # Without a config, the architecture is inferred from the array shapes.
  inferred = models.load(path).config
  for field in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim",
                "vocab_size", "post_norms"):
    assert getattr(inferred.text, field) == getattr(pg.config.text, field), field
  assert inferred.vision == pg.config.vision


def test_npz_keys_follow_big_vision(pg, tmp_path):
  path = str(tmp_path / "pg.npz")
  pg.export_npz(path)
  with np.load(path, allow_pickle=False) as z:
    keys = set(z.files)
  assert "llm/layers/attn/q_einsum/w" in keys and "llm/layers/mlp/gating_einsum" in keys
  assert "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel" in keys
  assert "img/head/kernel" in keys and "llm/embedder/input_embedding" in keys


def test_npz_bfloat16_stored_as_void_and_restored(pg, tmp_path):
  cfg = pg.config.with_dtypes(param_dtype="bfloat16")
  bf = models.load(_export(pg, tmp_path), config=cfg)  # params cast to bfloat16
  path = str(tmp_path / "bf16.npz")
  bf.export_npz(path)
  with np.load(path, allow_pickle=False) as z:
    assert z["llm/final_norm/scale"].dtype == np.dtype("V2")
  back = models.load(path, config=cfg)
  assert np.asarray(back.params["llm"]["final_norm"]["scale"]).dtype == BFLOAT16
  assert_same_params(bf.params, back.params)


def _export(model, tmp_path):
  path = str(tmp_path / "base.npz")
  model.export_npz(path)
  return path


def test_npz_fused_qkv_and_params_prefix(tmp_path):
  cfg = presets.tiny_paligemma2(vocab_size=64, sliding_window=None)
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_kv_heads=4))
  model = models.VLM.random(cfg, seed=3)
  flat = npz.to_bv_layout(model.params, cfg)
  assert "llm/layers/attn/qkv_einsum/w" in flat and flat["llm/layers/attn/qkv_einsum/w"].shape[1] == 3
  path = str(tmp_path / "fused.npz")
  np.savez(path, **{"params/" + k: v for k, v in flat.items()})
  assert_same_params(model.params, models.load(path, config=cfg).params)


def test_npz_vocab_rows_truncated_or_padded(pg, tmp_path):
  flat = npz.read_npz(_export(pg, tmp_path))
  emb = flat["llm/embedder/input_embedding"]
  for rows in (emb.shape[0] + 64, emb.shape[0] - 12):
    changed = dict(flat)
    changed["llm/embedder/input_embedding"] = np.concatenate(
        [emb, np.ones((64, emb.shape[1]), emb.dtype)])[:rows] if rows > emb.shape[0] else emb[:rows]
    path = str(tmp_path / f"v{rows}.npz")
    np.savez(path, **changed)
    got = np.asarray(models.load(path, config=pg.config).params["llm"]["embedder"]["input_embedding"])
    assert got.shape == emb.shape
    keep = min(rows, emb.shape[0])
    np.testing.assert_array_equal(got[:keep], emb[:keep])
    assert not got[keep:].any()


def test_position_embeddings_resampled_on_resolution_change(pg, tmp_path):
  path = _export(pg, tmp_path)
  big = models.load(path, config=pg.config, image_size=64)
  pos = np.asarray(big.params["img"]["pos_embedding"])
  old = np.asarray(pg.params["img"]["pos_embedding"])
  assert big.config.vision.image_size == 64 and pos.shape == (1, 64, old.shape[-1])
  old_grid, new_grid = old.reshape(4, 4, -1), pos.reshape(8, 8, -1)
  for (i, j), (a, b) in {(0, 0): (0, 0), (0, 3): (0, 7), (3, 0): (7, 0), (3, 3): (7, 7)}.items():
    np.testing.assert_allclose(new_grid[a, b], old_grid[i, j], atol=1e-6)
  images = np.zeros((1, 64, 64, 3), np.uint8)
  assert big.score(images, [[2, 5]], [[6, 7]])[0].shape == (2,)


def _write_official_gemma3(path, params, depth, vision_depth):
  """Writes params in the official Gemma 3 FLAT key layout (test-local code)."""
  f = _flat(params)
  tree = {}
  for i in range(depth):
    L = f"transformer/layer_{i}/"
    tree[L + "attn/q_einsum"] = {"w": f["llm/layers/attn/q_einsum/w"][i]}
    tree[L + "attn/kv_einsum"] = {"w": f["llm/layers/attn/kv_einsum/w"][i]}
    tree[L + "attn/attn_vec_einsum"] = {"w": f["llm/layers/attn/attn_vec_einsum/w"][i]}
    tree[L + "attn/_query_norm"] = {"scale": f["llm/layers/attn/query_norm/scale"][i]}
    tree[L + "attn/_key_norm"] = {"scale": f["llm/layers/attn/key_norm/scale"][i]}
    # The release stores gating as [2, F, D].
    tree[L + "mlp/gating_einsum"] = {"w": f["llm/layers/mlp/gating_einsum"][i].transpose(0, 2, 1)}
    tree[L + "mlp/linear"] = {"w": f["llm/layers/mlp/linear"][i]}
    for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
      tree[L + norm] = {"scale": f[f"llm/layers/{norm}/scale"][i]}
  tree["transformer/embedder"] = {"input_embedding": f["llm/embedder/input_embedding"]}
  tree["transformer/embedder/mm_input_projection"] = {"w": f["llm/embedder/mm_input_projection/w"]}
  tree["transformer/embedder/mm_soft_embedding_norm"] = {
      "scale": f["llm/embedder/mm_soft_embedding_norm/scale"]}
  tree["transformer/final_norm"] = {"scale": f["llm/final_norm/scale"]}
  V = "SigLiPFromPatches_0/siglip_encoder/"
  tree[V[:-1]] = {"pos_embedding": f["img/pos_embedding"]}
  tree[V + "embedding"] = {"kernel": f["img/embedding/kernel"], "bias": f["img/embedding/bias"]}
  tree[V + "Transformer/encoder_norm"] = {"scale": f["img/Transformer/encoder_norm/scale"],
                                          "bias": f["img/Transformer/encoder_norm/bias"]}
  blk = "img/Transformer/encoderblock/"
  for j in range(vision_depth):
    for key in [k for k in f if k.startswith(blk)]:
      node, leaf = key[len(blk):].rsplit("/", 1)
      tree.setdefault(V + f"Transformer/encoderblock_{j}/{node}", {})[leaf] = f[key][j]
  ocp.PyTreeCheckpointer().save(path, tree)


def test_gemma3_official_flat_layout_loads_to_same_model(hf_g3_dir, tmp_path):
  g3 = models.load(hf_g3_dir)
  path = str(tmp_path / "g3_flat")
  _write_official_gemma3(path, g3.params, g3.config.text.depth, g3.config.vision.depth)
  assert detect_format(path) == "gemma3_flat"
  back = models.load(path, config=g3.config)
  assert_same_params(g3.params, back.params)
  inferred = models.load(path).config
  assert (inferred.text.width, inferred.text.depth, inferred.text.num_kv_heads) == (64, 6, 2)
  assert inferred.vision.image_size == 32 and inferred.text.vision_proj_dim == 32
  # Our own FLAT writer produces the same layout.
  path2 = str(tmp_path / "g3_flat_ours")
  orbax_io.write_gemma3_flat(path2, g3.params, g3.config)
  assert_same_params(g3.params, models.load(path2, config=g3.config).params)


def test_native_orbax_round_trip_with_tokenizer(pg, tmp_path):
  tok = models.tokenizer.train_sentencepiece(
      ["a red circle left of a blue square"] * 50 + ["how many"] * 20, vocab_size=80)
  model = models.VLM(pg.config, pg.params, tok)
  path = str(tmp_path / "native")
  model.save(path)
  assert detect_format(path) == "auditdm"
  back = models.load(path)
  assert back.config == pg.config
  assert_same_params(pg.params, back.params)
  assert back.tokenizer is not None and back.tokenizer.encode("red circle") == tok.encode("red circle")
  model.save(path)  # overwriting an existing checkpoint works
  assert_same_params(pg.params, models.load(path).params)


def _upload(local, url):
  """Copies a local file or directory tree into fsspec's in-memory filesystem
  (a stand-in for gs://, which needs the network)."""
  import fsspec  # pylint: disable=import-outside-toplevel
  fs = fsspec.filesystem("memory")
  root = url.split("://", 1)[1]
  if os.path.isdir(local):
    for dirpath, _, files in os.walk(local):
      for f in files:
        rel = os.path.relpath(os.path.join(dirpath, f), local)
        fs.pipe(f"/{root}/{rel}", open(os.path.join(dirpath, f), "rb").read())
  else:
    fs.pipe(f"/{root}", open(local, "rb").read())


def test_remote_checkpoints_are_staged_once(pg, tmp_path, monkeypatch):
  """A URL checkpoint (memory:// standing in for gs://) is copied into the
  cache with its tokenizer, loads like the local one, and is not copied again."""
  monkeypatch.setenv("AUDITDM_CACHE", str(tmp_path / "cache"))
  tok = models.tokenizer.train_sentencepiece(["a red circle"] * 50 + ["how many"] * 20,
                                             vocab_size=80)
  npz_path = tmp_path / "up" / "pg.npz"
  npz_path.parent.mkdir()
  models.VLM(pg.config, pg.params, tok).export_npz(str(npz_path))
  tok.save(str(tmp_path / "up" / "tokenizer.model"))
  native = tmp_path / "native"
  models.VLM(pg.config, pg.params, tok).save(str(native))
  _upload(str(npz_path), "memory://bucket/ckpts/pg.npz")
  _upload(str(tmp_path / "up" / "tokenizer.model"), "memory://bucket/ckpts/tokenizer.model")
  _upload(str(native), "memory://bucket/ckpts/native")
  a = models.load("memory://bucket/ckpts/pg.npz")
  assert_same_params(models.load(str(npz_path)).params, a.params)
  assert a.tokenizer is not None and a.tokenizer.encode("red") == tok.encode("red")
  b = models.load("memory://bucket/ckpts/native")
  assert_same_params(pg.params, b.params)
  staged = sorted(str(p.relative_to(tmp_path / "cache")) for p in
                  (tmp_path / "cache").glob("staged/*/*"))
  assert len(staged) == 3 and not any(".staging." in p for p in staged)
  import fsspec  # pylint: disable=import-outside-toplevel
  fsspec.filesystem("memory").rm("/bucket/ckpts/pg.npz")
  again = models.load("memory://bucket/ckpts/pg.npz")      # from the cache
  assert_same_params(a.params, again.params)
  with pytest.raises(FileNotFoundError, match="memory://bucket/ckpts/missing.npz"):
    models.load("memory://bucket/ckpts/missing.npz")
  with pytest.raises(RuntimeError, match="no filesystem for nosuchfs://"):
    models.load("nosuchfs://bucket/x.npz")


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_missing_path_and_unknown_directory(tmp_path):
  with pytest.raises(CheckpointError, match="no such file"):
    models.load(str(tmp_path / "nope.npz"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="known formats"):
    models.load(str(tmp_path / "empty"))
  (tmp_path / "x.bin").write_bytes(b"hello")
  with pytest.raises(CheckpointError, match="not a .npz"):
    models.load(str(tmp_path / "x.bin"))


def test_npz_truncated_corrupt_and_pickled(pg, tmp_path):
  path = _export(pg, tmp_path)
  data = open(path, "rb").read()
  cut = tmp_path / "cut.npz"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="cut.npz"):
    models.load(str(cut), config=pg.config)
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, obj=np.array([{"a": 1}], dtype=object))
  with pytest.raises(CheckpointError, match="pickled.npz"):
    models.load(str(pickled))


def test_npz_missing_key_and_shape_mismatch_are_named(pg, tmp_path):
  flat = npz.read_npz(_export(pg, tmp_path))
  missing = dict(flat)
  del missing["llm/final_norm/scale"]
  path = str(tmp_path / "missing.npz")
  np.savez(path, **missing)
  with pytest.raises(CheckpointError, match=r"(?s)missing\.npz.*missing key 'llm/final_norm/scale'"):
    models.load(path, config=pg.config)
  wrong = dict(flat)
  wrong["llm/layers/mlp/linear"] = wrong["llm/layers/mlp/linear"][:, :100]
  path = str(tmp_path / "wrong.npz")
  np.savez(path, **wrong)
  with pytest.raises(CheckpointError, match=r"'llm/layers/mlp/linear' has shape \(4, 100, 64\) "
                     r"in the file but the config expects \(4, 128, 64\)"):
    models.load(path, config=pg.config)
  nan = dict(flat)
  nan["llm/final_norm/scale"] = np.full_like(nan["llm/final_norm/scale"], np.nan)
  path = str(tmp_path / "nan.npz")
  np.savez(path, **nan)
  with pytest.raises(CheckpointError, match="NaN"):
    models.load(path, config=pg.config)


def test_hf_bad_inputs(hf_pg_dir, tmp_path):
  import shutil
  bad = tmp_path / "hf"
  shutil.copytree(hf_pg_dir, bad)
  st = bad / "model.safetensors"
  data = st.read_bytes()
  st.write_bytes(data[:-1000])
  with pytest.raises(CheckpointError, match=r"tensor '.*'.*truncated"):
    models.load(str(bad))
  st.write_bytes(b"\x00" * 4)
  with pytest.raises(CheckpointError, match="too short"):
    models.load(str(bad))
  st.write_bytes(data)
  (bad / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="config.json: unreadable JSON"):
    models.load(str(bad))
  cfg = json.load(open(os.path.join(hf_pg_dir, "config.json")))
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
  with pytest.raises(CheckpointError, match="model_type is 'llama'"):
    models.load(str(bad))
  cfg["text_config"]["num_hidden_layers"] = 5
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="missing tensor 'text.layers.4"):
    models.load(str(bad))


def test_gemma3_flat_bad_inputs(hf_g3_dir, tmp_path):
  g3 = models.load(hf_g3_dir)
  path = str(tmp_path / "g3")
  _write_official_gemma3(path, g3.params, g3.config.text.depth, g3.config.vision.depth)
  with pytest.raises(CheckpointError, match="gemma3"):
    models.load(path, config=presets.tiny_paligemma2())
  wrong = g3.config.replace(text=dataclasses.replace(g3.config.text, mlp_dim=96))
  with pytest.raises(CheckpointError, match="mlp/linear' has shape"):
    models.load(path, config=wrong)
  os.remove(os.path.join(path, "manifest.ocdbt"))
  with pytest.raises(CheckpointError, match="Orbax could not restore"):
    models.load(path, config=g3.config)


def test_native_bad_inputs(pg, tmp_path):
  path = tmp_path / "native"
  pg.save(str(path))
  (path / "auditdm_model.json").write_text(json.dumps({"format": "other/v9"}))
  with pytest.raises(CheckpointError, match="expected 'auditdm_jax/model/v1'"):
    models.load(str(path))
  (path / "auditdm_model.json").write_text("][")
  with pytest.raises(CheckpointError, match="unreadable"):
    models.load(str(path))


def test_failed_save_leaves_previous_checkpoint_intact(pg, tmp_path, monkeypatch):
  path = str(tmp_path / "native")
  pg.save(path)
  before = sorted(os.listdir(path))

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(orbax_io, "atomic_write_text", boom)
  with pytest.raises(OSError, match="disk full"):
    pg.save(path)
  assert sorted(os.listdir(path)) == before
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
  assert_same_params(pg.params, models.load(path).params)
