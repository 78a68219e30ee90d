"""Named benchmarks scored with their own metrics through the per-sample
predictions journal (eval/predictions.py): a crash or a SIGTERM mid-benchmark
and a restart give the same eval.json with no sample predicted twice; the
same weights evaluated again (rectify's "before", then eval) generate nothing;
changed weights never read stale predictions."""

import io
import json
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from auditdm_jax import models
from auditdm_jax.data import named
from auditdm_jax.eval import benchmark, metrics, predictions
from auditdm_jax.models import presets
from auditdm_jax.models.tokenizer import train_sentencepiece
from auditdm_jax.pipeline import evaluation, placement
from auditdm_jax.stages import evaluate
from auditdm_jax.utils.digest import params_fingerprint

WORDS = ("what colour is the cat how many dogs are there yes no two three blue green a "
         "an of on in image answer en caption detect").split()
# Metrics of each shape: a per-record metric with ten answers, multiple
# choice, and corpus metrics (MME's pairs, CIDEr's images); every metric runs
# in tests/test_real_config.py's slow runlocal test.
BENCHES = {
    "vqa": dict(metric="vqa", prompt="answer en {question}"),
    "mc": dict(metric="choice"),
    "mme": dict(metric="mme"),
    "cap": dict(metric="cider", prompt="caption en", max_new_tokens=5),
}
N = 5          # records per benchmark; eval.batch = 2: three chunks each


_SAMPLERS = {}


@pytest.fixture(autouse=True)
def compiled_once(monkeypatch):
  """One sampler per set of weights for the whole module (its compilations are
  what costs on CPU); what is predicted, and when, is the journal's business."""
  real = placement.sampler

  def shared(config, name, model, *args, **kw):
    key = params_fingerprint(model.params)
    if key not in _SAMPLERS:
      _SAMPLERS[key] = real(config, name, model, *args, **kw)
    return _SAMPLERS[key]
  monkeypatch.setattr(placement, "sampler", shared)


def _png(rng) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _line(metric: str, i: int) -> dict:
  base = {"image": f"{i}.png", "prefix": f"how many dogs {i}", "question_id": f"q{i}"}
  if metric == "vqa":
    return dict(base, suffix=["two"] * 6 + ["three"] * 4)
  if metric == "choice":
    return dict(base, options=["two", "three", "blue"], suffix="ABC"[i % 3])
  if metric == "mme":
    return dict(base, suffix=["yes", "no"][i % 2], image_id=f"img{i // 2}",
                category="count", prefix=f"is it {i} Please answer yes or no.")
  return dict(base, suffix=["a cat", "two dogs"], image_id=f"img{i}")




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(data specs, tiny checkpoints: target and reference)."""
  root = tmp_path_factory.mktemp("named_eval")
  rng = np.random.default_rng(0)
  specs = {}
  for name, extra in BENCHES.items():
    d = root / "data" / name
    d.mkdir(parents=True)
    n = 6 if extra["metric"] == "mme" else N      # MME: 3 images, 2 questions each
    lines = [_line(extra["metric"], i) for i in range(n)]
    for i in range(len(lines)):
      (d / f"{i}.png").write_bytes(_png(rng))
    (d / "test.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    specs[name] = dict(kind="jsonl", path=str(d / "test.jsonl"), **extra)
  corpus = [" ".join(np.random.default_rng(1).choice(WORDS, 8)) for _ in range(300)]
  tok = train_sentencepiece(corpus, vocab_size=100, family="paligemma")
  cfg = presets.tiny_paligemma2(vocab_size=104, sliding_window=None)
  ckpts = {}
  for name, seed in (("target", 0), ("ref", 1)):
    ckpts[name] = str(root / "ckpt" / name)
    models.VLM.random(cfg, seed=seed, tokenizer=tok).save(ckpts[name])
  return specs, ckpts


def _workdir(tmp_path, ckpts, name="w"):
  w = tmp_path / name
  for m, path in ckpts.items():
    os.makedirs(w / "models", exist_ok=True)
    os.symlink(path, w / "models" / m)
  return str(w)


def _config(specs, answerers=("target", "ref")):
  c = ml_collections.ConfigDict()
  c.seed = 0
  roles = {"target": "target", "ref": "reference"}
  c.models = ml_collections.ConfigDict({
      m: dict(role=roles[m], preset="", checkpoint="") for m in answerers})
  c.data = ml_collections.ConfigDict({"benchmarks": specs})
  c.eval = ml_collections.ConfigDict(dict(max_examples=0, batch=2))
  c.audit = ml_collections.ConfigDict(dict(answer_tokens=3))
  return c


def _figures(workdir):
  with open(os.path.join(workdir, "eval.json")) as f:
    out = json.load(f)
  out.pop("wall_s")
  return out


def _journal_lines(workdir):
  """{journal dir (fingerprint/benchmark/settings): its lines, chunk by chunk}."""
  root = os.path.join(workdir, evaluation.PREDICTIONS)
  out = {}
  for d, _, files in os.walk(root):
    for f in sorted(files):
      if f.startswith("chunk-"):
        with open(os.path.join(d, f)) as fh:
          out.setdefault(os.path.relpath(d, root), []).extend(
              json.loads(line) for line in fh if line.strip())
  return out


class Count:
  """Counts (and passes on) benchmark.generate_text calls."""

  def __init__(self, monkeypatch):
    self.rows = 0
    real = benchmark.generate_text

    def spy(sampler, images, prompts, params, batch_size, rng=None):
      self.rows += len(prompts)
      return real(sampler, images, prompts, params, batch_size, rng)
    monkeypatch.setattr(benchmark, "generate_text", spy)


def test_metric_table_matches_the_metrics_module():
  """data/named.py's one table of needed fields covers every metric of
  eval/metrics/, and a record with those fields gives every field a metric
  reads (metric_row adds CIDEr's keys; RefCOCO's image size comes with meta)."""
  assert set(named.METRIC_FIELDS) == set(metrics.METRICS) == set(metrics.UNITS)
  derived = {"answer": "answers", "references": "answers", "id": "image_id",
             "image_size": "box"}
  for metric, reads in metrics.FIELDS.items():
    for f in reads:
      assert f in named.METRIC_FIELDS[metric] or derived.get(f) in named.METRIC_FIELDS[metric] \
          or (f == "answers" and "answers" in named.METRIC_FIELDS[metric]), (metric, f)


def test_score_named_reports_the_papers_units():
  recs = [{"id": "0", "question": "q", "answer": "two", "answers": ["two"] * 3 + ["2"] * 7,
           "category": "a"},
          {"id": "1", "question": "q", "answer": "no", "answers": ["yes"] * 10,
           "category": "b"}]
  rep = benchmark.score_named("vqa", recs, ["2", "no"])
  assert rep["metric"] == "vqa" and rep["unit"] == "%" and rep["score"] == pytest.approx(50.0)
  assert rep["by_category"] == {"a": pytest.approx(100.0), "b": 0.0}
  caps = [{"id": "q0", "image_id": "i0", "question": "", "answer": "a cat",
           "answers": ["a cat", "a small cat"]},
          {"id": "q1", "image_id": "i1", "question": "", "answer": "two dogs",
           "answers": ["two dogs", "two brown dogs"]}]
  rep = benchmark.score_named("cider", caps, ["a cat", "two dogs"])
  want = metrics.cider({"i0": "a cat", "i1": "two dogs"},
                       {"i0": ["a cat", "a small cat"], "i1": ["two dogs", "two brown dogs"]})
  assert rep["unit"] == "CIDEr x 100" and rep["score"] == pytest.approx(100 * want)
  mme = [{"id": str(i), "question": "", "answer": a, "answers": [a], "category": "count",
          "image_id": f"i{i // 2}"} for i, a in enumerate(["yes", "no", "yes", "no"])]
  rep = benchmark.score_named("mme", mme, ["yes", "no", "yes", "yes"])
  assert rep["score"] == pytest.approx(75.0 + 50.0)     # acc + acc+ of one category


def test_crash_mid_benchmark_then_restart_gives_the_same_eval_json(setup, tmp_path,
                                                                   monkeypatch):
  specs, ckpts = setup
  specs = {b: specs[b] for b in ("cap", "vqa")}   # a corpus and a per-record metric
  config = _config(specs, answerers=("target",))
  clean = _workdir(tmp_path, ckpts, "clean")
  evaluate.run(config, clean)
  ev = _figures(clean)
  for b, spec in specs.items():
    rep = ev["models"]["target"]["benchmarks"][b]
    assert rep["metric"] == spec["metric"] and rep["unit"] == metrics.UNITS[spec["metric"]]
    assert rep["records"] == N and np.isfinite(rep["score"])
  assert ev["benchmarks"]["cap"] == {"metric": "cider", "unit": "CIDEr x 100", "records": N}

  # Crash after the second chunk is journaled: the first benchmark ("cap",
  # sorted) is half done.
  w = _workdir(tmp_path, ckpts, "crashed")
  real = predictions.Journal.write_chunk
  writes = []

  def crashing(self, rows):
    path = real(self, rows)
    writes.append(path)
    if len(writes) == 2:
      raise RuntimeError("injected crash")
    return path
  monkeypatch.setattr(predictions.Journal, "write_chunk", crashing)
  with pytest.raises(RuntimeError, match="injected crash"):
    evaluate.run(config, w)
  monkeypatch.setattr(predictions.Journal, "write_chunk", real)
  assert not os.path.exists(os.path.join(w, "eval.json"))
  count = Count(monkeypatch)
  evaluate.run(config, w)
  assert _figures(w) == ev                       # the same figures as without the crash
  total = 2 * N
  assert count.rows == total - 4                 # the 2 chunks of 2 records were not redone
  lines = _journal_lines(w)
  assert len(lines) == len(specs)                # one journal per model and benchmark
  assert all(c == 1 for ls in lines.values() for c in predictions.count_ids(ls).values())
  assert sum(len(ls) for ls in lines.values()) == total


def test_sigterm_stops_after_the_chunk_and_a_restart_finishes(setup, tmp_path, monkeypatch):
  specs, ckpts = setup
  config = _config({"vqa": specs["vqa"]}, answerers=("target",))
  w = _workdir(tmp_path, ckpts)
  real = predictions.Journal.write_chunk

  def signalled(self, rows):
    path = real(self, rows)
    os.kill(os.getpid(), signal.SIGTERM)   # the handler only sets a flag
    return path
  monkeypatch.setattr(predictions.Journal, "write_chunk", signalled)
  with pytest.raises(SystemExit) as e:
    evaluate.run(config, w)
  assert e.value.code == 143 and "after 2 of 5 predictions of target on vqa" in str(e.value)
  monkeypatch.setattr(predictions.Journal, "write_chunk", real)
  assert sum(len(ls) for ls in _journal_lines(w).values()) == 2
  evaluate.run(config, w)
  lines = _journal_lines(w)
  assert sum(len(ls) for ls in lines.values()) == N
  assert all(c == 1 for ls in lines.values() for c in predictions.count_ids(ls).values())


def test_same_weights_reuse_predictions_and_changed_weights_do_not(setup, tmp_path,
                                                                   monkeypatch):
  """rectify's "before" (evaluation.evaluate_workdir_named) then the eval stage: the
  eval figures are rectify's, with nothing generated again; a model whose
  weights changed (rectified) is predicted afresh, in its own journal."""
  specs, ckpts = setup
  config = _config({"mc": specs["mc"], "mme": specs["mme"]})
  w = _workdir(tmp_path, ckpts)
  before = evaluation.evaluate_workdir_named(config, w, ["target", "ref"])
  count = Count(monkeypatch)
  evaluate.run(config, w)
  assert count.rows == 0
  ev = _figures(w)
  for m in ("target", "ref"):
    assert ev["models"][m]["benchmarks"] == before[m]["benchmarks"]
    assert ev["models"][m]["accuracy"] == {
        b: r["score"] / 100 for b, r in before[m]["benchmarks"].items()}
  old = _journal_lines(w)

  model = models.load(ckpts["target"])
  leaves, tree = jax.tree_util.tree_flatten(model.params)
  leaves[0] = np.asarray(leaves[0]) + np.float32(1e-3)     # one training step, in effect
  changed = models.VLM(model.config, tree.unflatten(leaves), model.tokenizer)
  path = str(tmp_path / "target_rectified")
  changed.save(path)
  after = evaluation.evaluate_workdir_named(config, w, ["target"], swap={"target": path})
  assert count.rows == N + 6                     # every record predicted again
  new = _journal_lines(w)
  assert {k: v for k, v in new.items() if k in old} == old     # old journals untouched
  assert len(new) == len(old) + 2
  assert set(after["target"]["benchmarks"]) == {"mc", "mme"}


@pytest.mark.slow
def test_sigkill_mid_benchmark_then_restart_gives_the_same_eval_json(setup, tmp_path):
  """A real kill: the eval stage in a subprocess, SIGKILLed as soon as its
  first predictions chunk is on disk; a second process finishes the
  benchmark. eval.json equals an uninterrupted run's and no record was
  journaled twice (chunk files are whole or absent: atomic renames)."""
  import subprocess
  import sys
  import time
  _, ckpts = setup
  rng = np.random.default_rng(3)
  d = tmp_path / "data"
  d.mkdir()
  n = 40                                    # 20 chunks of eval.batch = 2
  for i in range(n):
    (d / f"{i}.png").write_bytes(_png(rng))
  (d / "test.jsonl").write_text("\n".join(json.dumps(_line("vqa", i)) for i in range(n)) + "\n")
  specs = {"vqa": dict(kind="jsonl", path=str(d / "test.jsonl"), **BENCHES["vqa"])}
  config = _config(specs, answerers=("target",))
  (tmp_path / "config.json").write_text(config.to_json())
  clean = _workdir(tmp_path, ckpts, "clean")
  evaluate.run(config, clean)
  script = ("import json, sys, ml_collections\n"
            "from auditdm_jax.stages import evaluate\n"
            "c = ml_collections.ConfigDict(json.load(open(sys.argv[1])))\n"
            "evaluate.run(c, sys.argv[2])\n")
  w = _workdir(tmp_path, ckpts, "killed")
  root = os.path.join(w, evaluation.PREDICTIONS)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-c", script, str(tmp_path / "config.json"), w]
  proc = subprocess.Popen(cmd, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if any(f.startswith("chunk-") for _, _, fs in os.walk(root) for f in fs):
      proc.kill()
      break
    time.sleep(0.005)
  assert proc.wait(60) == -signal.SIGKILL, "the evaluation ended before it could be killed"
  assert not os.path.exists(os.path.join(w, "eval.json"))
  done = sum(len(ls) for ls in _journal_lines(w).values())
  assert 0 < done < n, done
  assert subprocess.run(cmd, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                        timeout=600, check=False).returncode == 0
  assert _figures(w) == _figures(clean)
  lines = _journal_lines(w)
  assert sum(len(ls) for ls in lines.values()) == n
  assert all(c == 1 for ls in lines.values() for c in predictions.count_ids(ls).values())
