"""The scene VQA TFDS build (array_record, no TensorFlow) and Grain loaders."""

from __future__ import annotations

import json
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

from auditdm_jax.data import loaders
from auditdm_jax.scenes import records
from auditdm_jax.scenes import tfds as scene_tfds
from auditdm_jax.scenes import examples, questions

TRAIN, BENCH = 48, 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  scene_tfds.build(d, TRAIN, BENCH)
  return d


def _assert_equal_records(got: dict, want: dict):
  assert set(got) == set(want) | {"index"}
  assert got["image"].dtype == np.uint8 and got["image"].shape == want["image"].shape
  np.testing.assert_array_equal(got["image"], want["image"])
  for key in scene_tfds.TEXT_FEATURES:
    assert isinstance(got[key], str) and got[key] == want[key], key


# ---------------------------------------------------------------- TFDS build


@pytest.mark.parametrize("split,size", [("train", TRAIN), ("benchmark", BENCH)])
def test_records_equal_examples(data_dir, split, size):
  src = scene_tfds.data_source(data_dir, split, TRAIN, BENCH)
  assert len(src) == size
  for i in range(size):
    record = src[i]
    assert record["index"] == i
    _assert_equal_records(record, examples.example(examples.SPLIT_SEEDS[split], i))
  batch = src.__getitems__([3, 1])
  assert [r["index"] for r in batch] == [3, 1]


def test_benchmark_has_every_skill(data_dir):
  src = scene_tfds.data_source(data_dir, "benchmark", TRAIN, BENCH)
  assert {src[i]["skill"] for i in range(len(src))} == set(questions.SKILLS)


def test_build_is_reused_and_sizes_do_not_collide(data_dir):
  path = scene_tfds.dataset_path(data_dir, scene_tfds.make_config(TRAIN, BENCH))
  stamp = sorted((f.name, os.stat(f).st_mtime_ns) for f in path.iterdir())
  assert scene_tfds.build(data_dir, TRAIN, BENCH) == path
  assert sorted((f.name, os.stat(f).st_mtime_ns) for f in path.iterdir()) == stamp
  assert "train48_benchmark32_seed_images0" in str(path)
  assert not scene_tfds.is_built(data_dir, TRAIN + 1, BENCH)
  with pytest.raises(FileNotFoundError, match="no finished scene_vqa build"):
    scene_tfds.data_source(data_dir, "train", TRAIN + 1, BENCH)
  with pytest.raises(ValueError, match="split 'seed_images' is not in build"):
    scene_tfds.data_source(data_dir, "seed_images", TRAIN, BENCH)


@pytest.mark.parametrize("sizes,error,match", [
    ((0, 8), ValueError, "train_size must be >= 1"),
    ((-3, 8), ValueError, "train_size must be >= 1"),
    ((2.5, 8), TypeError, "train_size must be an int"),
    ((True, 8), TypeError, "train_size must be an int"),
    ((8, 7), ValueError, "benchmark_size must be >= 8 so that every one of the 8 skills"),
    ((8, 8, -1), ValueError, "seed_images_size must be >= 0"),
])
def test_bad_sizes_are_refused(tmp_path, sizes, error, match):
  with pytest.raises(error, match=match):
    scene_tfds.build(tmp_path, *sizes)
  with pytest.raises(error, match=match):
    scene_tfds.make_config(*sizes)
  assert not list(tmp_path.iterdir())


def test_interrupted_build_is_not_finished(tmp_path, monkeypatch):
  real = records.encoded_record

  def crash_at_10(seed, index):
    if index == 10:
      raise OSError("disk on fire")
    return real(seed, index)

  monkeypatch.setattr(records, "encoded_record", crash_at_10)
  with pytest.raises(OSError, match="disk on fire"):
    scene_tfds.build(tmp_path, 16, 8, 8)
  assert not scene_tfds.is_built(tmp_path, 16, 8, 8)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    scene_tfds.data_source(tmp_path, "train", 16, 8, 8)
  monkeypatch.setattr(records, "encoded_record", real)
  scene_tfds.build(tmp_path, 16, 8, 8)
  src = scene_tfds.data_source(tmp_path, "seed_images", 16, 8, 8)
  assert len(src) == 8
  _assert_equal_records(src[7], examples.example(examples.SPLIT_SEEDS["seed_images"], 7))


def test_half_written_build_is_replaced(tmp_path):
  path = scene_tfds.build(tmp_path, 16, 8)
  shard = next(f for f in path.iterdir() if "train.array_record" in f.name)
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])                   # truncated shard
  assert not scene_tfds.is_built(tmp_path, 16, 8)
  with pytest.raises(FileNotFoundError, match="shard"):
    scene_tfds.data_source(tmp_path, "train", 16, 8)
  (path / "dataset_info.json").unlink()                      # and no info file
  reason = scene_tfds.incomplete_reason(path, scene_tfds.make_config(16, 8))
  assert "no dataset_info.json" in reason
  assert scene_tfds.build(tmp_path, 16, 8) == path            # rebuilt in place
  assert scene_tfds.is_built(tmp_path, 16, 8)
  _assert_equal_records(scene_tfds.data_source(tmp_path, "train", 16, 8)[15],
                        examples.example(examples.SPLIT_SEEDS["train"], 15))


def test_build_with_worker_processes_writes_the_same_records(tmp_path, data_dir):
  scene_tfds.build(tmp_path, 16, 8, num_workers=2)
  for split in ("train", "benchmark"):
    got = scene_tfds.data_source(tmp_path, split, 16, 8)
    want = scene_tfds.data_source(data_dir, split, TRAIN, BENCH)
    for i in range(len(got)):
      _assert_equal_records(got[i], want[i])
      assert got[i]["index"] == i


# ------------------------------------------------------------ Grain loaders


def _list_source(n=TRAIN):
  return [{"index": np.int64(i), "x": np.full((2, 3), i, np.float32), "s": f"r{i}"}
          for i in range(n)]


class KeepNotMultipleOf3(grain.transforms.Filter):
  def filter(self, element):
    return element["index"] % 3 != 0


class AddNoise(grain.transforms.RandomMap):
  def random_map(self, element, rng):
    return {**element, "noise": rng.uniform(size=(2,)).astype(np.float32)}


def double_x(element):
  return {**element, "x": element["x"] * 2}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_loader_order_is_a_function_of_the_seed():
  src = _list_source()
  kw = {"batch_size": 8, "shard_by_process": False}
  a = _take(loaders.train_loader(src, seed=0, **kw), 5)
  b = _take(loaders.train_loader(src, seed=0, **kw), 5)
  c = _take(loaders.train_loader(src, seed=1, **kw), 5)
  _assert_batches_equal(a, b)
  assert [x["index"].tolist() for x in a] != [x["index"].tolist() for x in c]
  assert a[0]["x"].shape == (8, 2, 3) and a[0]["s"].dtype.kind == "U"
  # Epoch 1 and epoch 2 (batches 6..11) are different permutations of all records.
  it = loaders.train_loader(src, seed=0, **kw)
  e1 = np.concatenate([b["index"] for b in _take(it, 6)])
  e2 = np.concatenate([b["index"] for b in _take(it, 6)])
  assert sorted(e1) == sorted(e2) == list(range(TRAIN)) and list(e1) != list(e2)


def test_epoch_is_split_over_processes():
  src = _list_source()
  seen = []
  for p in range(2):
    opts = grain.sharding.ShardOptions(shard_index=p, shard_count=2, drop_remainder=True)
    it = loaders.train_loader(src, batch_size=5, seed=3, num_epochs=1,
                               shard_options=opts, drop_remainder=False)
    ids = [i for b in it for i in b["index"].tolist()]
    assert len(ids) == TRAIN // 2
    seen += ids
  assert sorted(seen) == list(range(TRAIN))


def test_batch_rows_sharding_rebuilds_the_one_process_batches():
  """shard_mode="batch_rows": the rows of processes 0 and 1, side by side, are
  the batches (and RandomMap draws) of one process with twice the batch size,
  across epochs, and each process's state restores its own stream."""
  src = _list_source()
  kw = {"seed": 7, "transforms": [double_x, AddNoise()], "shard_mode": "batch_rows"}
  one = _take(loaders.train_loader(src, batch_size=8, shard_by_process=False, **kw), 9)
  parts = []
  for p in range(2):
    opts = grain.sharding.ShardOptions(shard_index=p, shard_count=2)
    parts.append(_take(loaders.train_loader(src, batch_size=4, shard_options=opts, **kw), 9))
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)]
  _assert_batches_equal(joined, one)
  assert not np.array_equal(parts[0][0]["index"], parts[1][0]["index"])
  # One finite epoch of 50 records in global batches of 8: 6 full batches, and
  # the last 2 records belong to process 0's rows of the 7th.
  ends = []
  for p in range(2):
    opts = grain.sharding.ShardOptions(shard_index=p, shard_count=2)
    it = loaders.train_loader(_list_source(50), batch_size=4, shard_options=opts, num_epochs=1,
                               drop_remainder=False, **kw)
    ends.append([len(b["index"]) for b in it])
  assert ends == [[4] * 6 + [2], [4] * 6]
  opts = grain.sharding.ShardOptions(shard_index=1, shard_count=2)
  it = loaders.train_loader(src, batch_size=4, shard_options=opts, **kw)
  _take(it, 3)
  state = it.get_state()
  fresh = loaders.train_loader(src, batch_size=4, shard_options=opts, **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 6), parts[1][3:])
  other = loaders.train_loader(src, batch_size=4, seed=7, shard_options=opts,
                                transforms=kw["transforms"])          # shard_mode="records"
  with pytest.raises(ValueError, match="does not match"):
    other.set_state(state)
  with pytest.raises(ValueError, match="shard_mode"):
    loaders.train_loader(src, batch_size=4, seed=0, shard_mode="rows")


def test_transforms_can_drop_records():
  src = _list_source()
  it = loaders.train_loader(src, batch_size=5, seed=0, num_epochs=1, drop_remainder=False,
                             shard_by_process=False,
                             transforms=[KeepNotMultipleOf3(), double_x, AddNoise()])
  batches = list(it)
  ids = [i for b in batches for i in b["index"].tolist()]
  assert sorted(ids) == [i for i in range(TRAIN) if i % 3]
  assert [len(b["index"]) for b in batches] == [5] * 6 + [2]
  for b in batches:
    np.testing.assert_array_equal(b["x"][:, 0, 0], 2 * b["index"])
    assert b["noise"].shape == (len(b["index"]), 2)
  dropped = loaders.train_loader(src, batch_size=5, seed=0, num_epochs=1,
                                  shard_by_process=False, transforms=[KeepNotMultipleOf3()])
  assert len(list(dropped)) == 6                              # last partial batch dropped
  none_drops = loaders.train_loader(
      src, batch_size=48, seed=0, num_epochs=1, shard_by_process=False, drop_remainder=False,
      transforms=[lambda r: r if r["index"] < 10 else None])
  assert sorted(next(none_drops)["index"].tolist()) == list(range(10))
  with pytest.raises(TypeError, match="batches by itself"):
    loaders.train_loader(src, batch_size=5, seed=0, transforms=[grain.transforms.Batch(4)])


def test_worker_processes_give_the_same_batches(data_dir):
  """worker_count=2 with the TFDS source (pickled into spawned workers)."""
  # Grain reads absl flags when it starts workers: outside absl.app.run they
  # must be marked parsed (train_loader does it too when worker_count > 0).
  flags.FLAGS.mark_as_parsed()
  src = scene_tfds.data_source(data_dir, "train", TRAIN, BENCH)
  transforms = [KeepNotMultipleOf3(), AddNoise()]
  kw = {"batch_size": 6, "seed": 5, "transforms": transforms, "shard_by_process": False}
  want = _take(loaders.train_loader(src, worker_count=0, **kw), 9)  # > 1 epoch
  with loaders.train_loader(src, worker_count=2, **kw) as it:
    got = _take(it, 4)
    state = it.get_state()
    got += _take(it, 5)
  _assert_batches_equal(got, want)
  assert got[0]["image"].shape == (6, 48, 48, 3) and got[0]["image"].dtype == np.uint8
  # The state does not depend on the worker count either.
  in_process = loaders.train_loader(src, worker_count=0, **kw)
  in_process.set_state(state)
  _assert_batches_equal(_take(in_process, 5), want[4:])


def test_iterator_state_round_trips_through_orbax(tmp_path):
  src = _list_source()
  kw = {"batch_size": 4, "seed": 11, "shard_by_process": False,
        "transforms": [KeepNotMultipleOf3(), AddNoise()]}
  reference = loaders.train_loader(src, **kw)
  expected = _take(reference, 12)
  it = loaders.train_loader(src, **kw)
  _take(it, 5)
  params = {"w": np.arange(6, dtype=np.float32)}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                         data=loaders.save_args(it)))
    mngr.wait_until_finished()
  assert (tmp_path / "ckpt" / "5" / "data" / "process_0-of-1.json").exists()
  _take(it, 2)                                             # moves on after the save
  fresh = loaders.train_loader(src, **kw)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(5, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), data=loaders.restore_args(fresh)))
  assert restored["data"] is fresh
  np.testing.assert_array_equal(restored["params"]["w"], params["w"])
  _assert_batches_equal(_take(fresh, 7), expected[5:])


def test_eval_batches_pad_the_last_batch():
  src = _list_source(10)
  out = list(loaders.eval_batches(src, 4, transforms=[double_x]))
  assert len(out) == 3
  ids = [b["index"].tolist() for b, _ in out]
  assert ids[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]] and ids[2][:2] == [8, 9]
  assert [v.tolist() for _, v in out] == [[True] * 4, [True] * 4, [True, True, False, False]]
  last, _ = out[2]
  assert all(len(x) == 4 for x in last.values())
  np.testing.assert_array_equal(last["x"][:, 0, 0], 2 * last["index"])
  kept = np.concatenate([b["index"][v] for b, v in out])
  np.testing.assert_array_equal(kept, np.arange(10))
  with pytest.raises(TypeError, match="1:1 maps only"):
    list(loaders.eval_batches(src, 4, transforms=[KeepNotMultipleOf3()]))


# ------------------------------------------ named datasets (data/named.py)


def _png(image) -> bytes:
  import io  # pylint: disable=import-outside-toplevel

  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _write_jsonl(root, records, put):
  """records -> a big_vision-style jsonl at root/vqa/val.jsonl with images in
  root/vqa/images/ (written through `put(path, bytes)`)."""
  lines = []
  for i, r in enumerate(records):
    put(f"{root}/vqa/images/{i:03d}.png", _png(r["image"]))
    lines.append(json.dumps({"image": f"images/{i:03d}.png", "prefix": r["question"],
                             "suffix": r["answer"]}))
  put(f"{root}/vqa/val.jsonl", ("\n".join(lines) + "\n").encode())
  return f"{root}/vqa/val.jsonl"


def _put_local(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def test_named_tfds_and_jsonl_datasets_read_the_same_records(data_dir, tmp_path):
  """A TFDS array_record build, a local jsonl and a jsonl behind a URL
  (memory://, standing in for gs://) give the same images, questions and answers;
  images are resized to the model's resolution on read."""
  import fsspec  # pylint: disable=import-outside-toplevel

  from auditdm_jax.data import named  # pylint: disable=import-outside-toplevel
  bench = scene_tfds.data_source(data_dir, "benchmark", TRAIN, BENCH)
  records = [bench[i] for i in range(6)]
  cfg_name = scene_tfds.config_name(TRAIN, BENCH)
  tf_spec = {"kind": "tfds", "name": f"{scene_tfds.NAME}/{cfg_name}", "split": "benchmark",
             "data_dir": str(data_dir)}
  local = {"kind": "jsonl", "path": _write_jsonl(str(tmp_path), records, _put_local)}
  mem = fsspec.filesystem("memory")
  remote = {"kind": "jsonl", "path": _write_jsonl("memory://named_test", records,
                                                  lambda p, d: mem.pipe(p[len("memory:/"):], d))}
  for spec in (tf_spec, local, remote):
    assert named.problems(spec, "data.x") == []
    src = named.open_source(spec)
    for i, want in enumerate(records):
      got = src[i]
      np.testing.assert_array_equal(got["image"], want["image"])
      assert (got["question"], got["answer"]) == (want["question"], want["answer"])
  assert len(named.open_source(local)) == 6 and len(named.open_source(tf_spec)) == BENCH
  big = named.open_source(local, image_size=96)[0]["image"]
  assert big.shape == (96, 96, 3) and big.dtype == np.uint8


def test_named_dataset_problems_are_named(tmp_path):
  from auditdm_jax.data import named  # pylint: disable=import-outside-toplevel
  p = named.problems
  assert "kind is 'csv'" in p({"kind": "csv"}, "data.seed_images")[0]
  assert "unknown keys ['split']" in p({"kind": "jsonl", "path": "x", "split": "a"}, "d")[0]
  assert "need ['name', 'split']" in p({"kind": "tfds", "name": "x"}, "d")[0]
  missing = str(tmp_path / "nope.jsonl")
  assert f"{missing} does not exist" in p({"kind": "jsonl", "path": missing}, "d")[0]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"image": "a.png", "prefix": "q"}\nnot json\n')
  assert "a.png does not exist" in p({"kind": "jsonl", "path": str(bad)}, "d")[0]
  with pytest.raises(ValueError, match="line 2 is not JSON"):
    named.open_source({"kind": "jsonl", "path": str(bad)})
  nokey = tmp_path / "nokey.jsonl"
  nokey.write_text('{"img": "a.png", "prefix": "q"}\n')
  assert "no string 'image'" in p({"kind": "jsonl", "path": str(nokey)}, "d")[0]
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "a.png").write_bytes(b"not a png")
  (broken / "b.jsonl").write_text('{"image": "a.png", "prefix": "q", "suffix": "x"}\n')
  with pytest.raises(ValueError, match="a.png: not a readable image"):
    named.open_source({"kind": "jsonl", "path": str(broken / "b.jsonl")})[0]
  got = p({"kind": "tfds", "name": "no_such_dataset_xyz", "split": "val",
           "data_dir": str(tmp_path)}, "data.benchmarks.x")
  assert got and got[0].startswith("data.benchmarks.x: TFDS 'no_such_dataset_xyz'"), got


def _write_lines(path, lines, images=("a.png",)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(0)
  for name in images:
    _put_local(os.path.join(os.path.dirname(path), name),
               _png(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)))
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(line) for line in lines) + "\n")
  return path


def test_named_records_keep_every_field_the_metrics_need(tmp_path):
  """Every reference answer, the ids, categories, options (list or letter
  columns) and boxes come through; today's {"image", "prefix", "suffix"}
  lines read as before; the prompt follows the spec's template."""
  from auditdm_jax.data import named  # pylint: disable=import-outside-toplevel
  old = _write_lines(str(tmp_path / "old" / "v.jsonl"),
                     [{"image": "a.png", "prefix": "answer en what?", "suffix": "two"}])
  r = named.open_source({"kind": "jsonl", "path": old})[0]
  assert (r["question"], r["prompt"], r["answer"], r["answers"], r["id"]) == (
      "answer en what?", "answer en what?", "two", ["two"], "0")
  assert r["image_size"] == [40, 30] and r["image"].shape == (30, 40, 3)
  vqa = _write_lines(str(tmp_path / "vqa" / "v.jsonl"), [
      {"image": "a.png", "prefix": "what?", "suffix": ["two", "2", "two"],
       "question_id": 7, "image_id": "img1", "category": "count", "subcategory": "small"}])
  spec = {"kind": "jsonl", "path": vqa, "metric": "vqa", "prompt": "answer en {question}"}
  assert named.problems(spec, "data.benchmarks.vqav2") == []
  src = named.open_source(spec)
  r = src[0]
  assert r["answers"] == ["two", "2", "two"] and r["answer"] == "two"
  assert (r["id"], r["question_id"], r["image_id"], r["category"], r["subcategory"]) == (
      "7", "7", "img1", "count", "small")
  assert r["prompt"] == "answer en what?"
  meta = src.meta(0)
  assert "image" not in meta and "image_size" not in meta and meta["answers"] == r["answers"]
  mc = _write_lines(str(tmp_path / "mc" / "v.jsonl"), [
      {"image": "a.png", "q": "which?", "options": {"A": "cat", "B": "dog", "C": ""},
       "suffix": "B"},
      {"image": "a.png", "q": "which?", "options": ["cat", "dog"],
       "suffix": "dog"}])
  src = named.open_source({"kind": "jsonl", "path": mc, "metric": "choice",
                           "question_key": "q"})
  assert src[0]["options"] == ["cat", "dog"] and src[1]["options"] == ["cat", "dog"]
  assert src[0]["prompt"] == "which?\nA. cat\nB. dog"
  ref = _write_lines(str(tmp_path / "ref" / "v.jsonl"), [
      {"image": "a.png", "prefix": "the cat", "bbox": [1, 2, 10, 20]}])
  src = named.open_source({"kind": "jsonl", "path": ref, "metric": "refcoco",
                           "box_key": "bbox", "prompt": "detect {question}"})
  assert src[0]["box"] == [1.0, 2.0, 10.0, 20.0] and src[0]["prompt"] == "detect the cat"
  assert src.meta(0)["image_size"] == [40, 30]    # RefCOCO's boxes are in these pixels
  cap = _write_lines(str(tmp_path / "cap" / "v.jsonl"), [
      {"image": "a.png", "suffix": ["a cat", "a small cat"], "image_id": 1}])
  r = named.open_source({"kind": "jsonl", "path": cap, "metric": "cider",
                         "prompt": "caption en"})[0]
  assert r["prompt"] == "caption en" and r["answers"] == ["a cat", "a small cat"]


def test_named_records_missing_a_metric_field_are_refused_by_name(tmp_path):
  from auditdm_jax.data import named  # pylint: disable=import-outside-toplevel
  path = _write_lines(str(tmp_path / "b" / "v.jsonl"), [
      {"image": "a.png", "prefix": "q", "suffix": "yes", "image_id": 1, "category": "count"},
      {"image": "a.png", "prefix": "q", "suffix": "no", "category": "count"}])
  spec = {"kind": "jsonl", "path": path, "metric": "mme"}
  assert named.problems(spec, "d") == []     # the config check reads the first line
  with pytest.raises(ValueError, match=r"line 2 has no 'image_id' \(key 'image_id'\), which "
                     r"metric 'mme' needs"):
    named.open_source(spec)
  for metric, field in (("refcoco", "'box'"), ("choice", "'options'"),
                        ("circular", "'options' \\(key 'options'\\), 'group'")):
    got = named.problems(dict(spec, metric=metric), "data.benchmarks.x")
    assert len(got) == 1 and f"which metric '{metric}' needs" in got[0], got
    with pytest.raises(ValueError, match=f"line 1 has no {field}"):
      named.open_source(dict(spec, metric=metric))
  nothing = _write_lines(str(tmp_path / "n" / "v.jsonl"), [{"image": "a.png", "prefix": "q"}])
  assert "has no 'answers' (key 'suffix')" in named.problems(
      {"kind": "jsonl", "path": nothing, "metric": "vqa"}, "d")[0]
  assert named.problems({"kind": "jsonl", "path": nothing}, "d") == []   # seeds: no metric
  bad = _write_lines(str(tmp_path / "c" / "v.jsonl"), [
      {"image": "a.png", "prefix": "q", "suffix": "E", "options": ["x", "y"]}])
  with pytest.raises(ValueError, match=r"answer 'E' is neither an option letter \(A-B\)"):
    named.open_source({"kind": "jsonl", "path": bad, "metric": "choice"})
  with pytest.raises(ValueError, match="answer 'E' is not 'yes' or 'no'"):
    named.open_source({"kind": "jsonl", "path": bad, "metric": "pope"})
  p = named.problems
  assert "metric is 'bleu'" in p({"kind": "jsonl", "path": bad, "metric": "bleu"}, "d")[0]
  assert "may use only {question} and {options}" in p(
      {"kind": "jsonl", "path": bad, "prompt": "{image}"}, "d")[0]
  dup = _write_lines(str(tmp_path / "d" / "v.jsonl"), [
      {"image": "a.png", "prefix": "q", "suffix": "x", "question_id": 3},
      {"image": "a.png", "prefix": "q", "suffix": "x", "question_id": 3}])
  with pytest.raises(ValueError, match="line 2: question_id '3' repeats line 1"):
    named.open_source({"kind": "jsonl", "path": dup})


def test_named_tfds_features_are_named_by_the_spec(data_dir):
  """TFDS builds: the *_key entries name the features (the scene build's
  `skill` as the category, its `index` as the question id); a feature the
  metric needs and the build lacks is refused by name."""
  from auditdm_jax.data import named  # pylint: disable=import-outside-toplevel
  cfg_name = scene_tfds.config_name(TRAIN, BENCH)
  spec = {"kind": "tfds", "name": f"{scene_tfds.NAME}/{cfg_name}", "split": "benchmark",
          "data_dir": str(data_dir), "metric": "exact", "category_key": "skill",
          "question_id_key": "index"}
  bench = scene_tfds.data_source(data_dir, "benchmark", TRAIN, BENCH)
  assert named.problems(spec, "d") == []
  src = named.open_source(spec)
  for i in (0, 5):
    r, want = src[i], bench[i]
    assert (r["category"], r["id"], r["answers"]) == (want["skill"], str(i), [want["answer"]])
    assert src.meta(i)["category"] == want["skill"]
  missing = dict(spec, metric="refcoco")
  assert "which metric 'refcoco' needs" in named.problems(missing, "d")[0]
  with pytest.raises(ValueError, match=r"\[0\] has no 'box' \(key 'box'\)"):
    named.open_source(missing)
