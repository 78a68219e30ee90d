"""Supervised fine-tuning (auditdm_jax.train): learning, token-weighted
gradient accumulation, frozen towers, non-finite losses, exact resumption
after SIGKILL and after SIGTERM (saved at the step), 8-device sharding and
TrainConfig validation.

Everything uses one tiny PaliGemma 2 and a toy task (the answer token names
the brightness class of the image). Runs that need their own process (the
killed run, 8 host devices) call this file as a script:
  PYTHONPATH=. python tests/test_train.py run WORKDIR OUT.npz [SLEEP]
  PYTHONPATH=. python tests/test_train.py sharded WORKDIR OUT.npz
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import flax
import grain
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from auditdm_jax import models, sharding
from auditdm_jax.models import handle, presets, vlm
from auditdm_jax.train import (
  NonFiniteLossError,
  TrainConfig,
  Trainer,
  loss_fn,
  make_optimizer,
  sft_batch,
  sft_example,
  train,
)
from auditdm_jax.train import ckpt as ckpt_lib
from auditdm_jax.train.metrics import read_metrics
from auditdm_jax.train.optim import path_str

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = presets.tiny_paligemma2(width=32, depth=2, vision_width=16, vision_depth=1,
                              sliding_window=None)
SEQ, BATCH, STEPS = 8, 8, 12
# XLA's -O0 compiles the tiny steps ~3x faster on a busy 2-core CPU; every run
# here (and in the subprocesses) uses the same options, so results stay exact.
FAST = {"xla_backend_optimization_level": 0}
BASE = TrainConfig(steps=STEPS, lr=3e-2, warmup_steps=2, weight_decay=1e-4, grad_clip=1.0,
                   log_every=1, checkpoint_every=4, keep_checkpoints=2, fsdp_min_size=0,
                   eval_every=6, progress=False, compiler_options=FAST)
ACCUM = dataclasses.replace(BASE, grad_accum=2)
SHARDED = dataclasses.replace(ACCUM, checkpoint_every=STEPS)   # one (slow, sharded) save


# ----------------------------------------------------------------------------
# Toy data and helpers.
# ----------------------------------------------------------------------------


def example(i: int) -> dict:
  """Row i: an image of brightness class c (4 classes); the answer repeats
  token 200 + c one to three times (so rows hold different token counts)."""
  r = np.random.default_rng(int(i))
  c = int(r.integers(0, 4))
  image = np.clip(c * 64 + r.integers(0, 32, (32, 32, 3)), 0, 255).astype(np.uint8)
  prompt = [2] + r.integers(3, 100, int(r.integers(1, 3))).tolist() + [108]
  answer = [200 + c] * int(r.integers(1, 4)) + [1]
  return sft_example(CFG, image, prompt, answer, SEQ)


def eval_fn(params, step):
  return {"final_norm": float(np.mean(np.asarray(params["llm"]["final_norm"]["scale"]))),
          "step": step}


def data_iter(sleep: float = 0.0, n: int = 64):
  """A Grain iterator of BATCH-row batches (shuffled, repeated); `sleep`
  slows each batch down (to kill a run mid-way)."""
  ds = grain.MapDataset.range(n).shuffle(seed=3).map(example).repeat().batch(BATCH)
  if sleep:
    ds = ds.map(lambda b: (time.sleep(sleep), b)[1])
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def init_params():
  """Random parameters drawn with numpy (nothing to compile): N(0, 0.05)
  weights, zero biases, unit SigLIP LayerNorm scales (Gemma's RMSNorm scales
  are offsets from 1, so they get noise like the rest)."""
  rng = np.random.default_rng(0)
  flat = {}
  for k, a in sorted(flax.traverse_util.flatten_dict(vlm.abstract_params(CFG), sep="/").items()):
    if k.startswith("img/") and k.endswith("/scale"):
      flat[k] = np.ones(a.shape, a.dtype)
    elif k.endswith("/bias"):
      flat[k] = np.zeros(a.shape, a.dtype)
    else:
      flat[k] = (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def fast_jit(fn, *args):
  """fn compiled for args with FAST options."""
  return jax.jit(fn).lower(*args).compile(FAST)


def flat_np(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


def ckpt_steps(workdir) -> list[int]:
  d = os.path.join(workdir, "ckpt")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def subprocess_env(cache_dir, devices: int = 1) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def script(mode: str, *args) -> list[str]:
  return [sys.executable, os.path.abspath(__file__), mode, *map(str, args)]


@pytest.fixture(scope="module")
def params0():
  return init_params()


@pytest.fixture(scope="module")
def baseline(params0, tmp_path_factory):
  """An uninterrupted BASE run: (final params as numpy, summary, workdir)."""
  workdir = tmp_path_factory.mktemp("baseline")
  params, summary = train(CFG, params0, data_iter(), BASE, str(workdir), eval_fn=eval_fn)
  return flat_np(params), summary, workdir


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A persistent compilation cache shared by this module's subprocesses."""
  return tmp_path_factory.mktemp("jax_cache")


# ----------------------------------------------------------------------------
# Learning, logging, determinism.
# ----------------------------------------------------------------------------


def test_loss_decreases_and_metrics_are_logged(baseline):
  _, summary, workdir = baseline
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  losses = [r["loss"] for r in rows]
  assert losses[-1] < 0.5 * losses[0], losses
  assert rows[-1]["accuracy"] > rows[0]["accuracy"]
  for key in ("loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "step_time",
              "answer_tokens"):
    assert key in rows[-1], rows[-1]
  # Linear warm-up over 2 steps (lr 0 at the first update), then cosine to 0.
  assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(BASE.lr)
  assert rows[-1]["lr"] < rows[3]["lr"]
  assert [r["step"] for r in rows if "eval/final_norm" in r] == [6, 12]   # eval_every=6
  assert rows[5]["eval/step"] == 6
  assert summary["steps"] == STEPS and not summary["resumed"]
  assert summary["checkpoints"] == [8, 12] == ckpt_steps(workdir)   # keep_checkpoints=2
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir / "tb"))
  assert json.loads((workdir / "summary.json").read_text())["steps"] == STEPS


def test_same_seed_and_data_give_identical_params(baseline, params0, tmp_path, capsys):
  tcfg = dataclasses.replace(BASE, export_final=True, progress=True, tensorboard=False)
  params, _ = train(CFG, params0, data_iter(), tcfg, str(tmp_path))
  again = flat_np(params)
  for k, v in baseline[0].items():
    assert np.array_equal(again[k], v), k
  assert "train: 100%" in capsys.readouterr().err        # the tqdm bar
  exported = flat_np(models.load(str(tmp_path / "final")).params)   # export_final
  assert all(np.array_equal(exported[k], v) for k, v in again.items())


@pytest.mark.parametrize("family", ["paligemma", "gemma3"])
def test_loss_is_the_token_weighted_answer_nll(family, params0):
  """loss_fn agrees with handle.token_logprobs over the answer tokens only
  (Gemma 3: the prompt's <start_of_image> expanded into the image block)."""
  b = next(data_iter())
  cfg, params = CFG, params0
  if family == "gemma3":
    cfg = presets.tiny_gemma3(width=32, depth=2, vision_width=16, vision_depth=1,
                              mm_tokens_per_image=4)
    params = jax.tree.map(lambda a: (0.05 * np.random.default_rng(1).standard_normal(a.shape))
                          .astype(a.dtype), vlm.abstract_params(cfg))
    b = sft_batch(cfg, b["images"], [[2, cfg.boi_id, 7, 8]] * 4 + [[2, 9, cfg.boi_id]] * 4,
                  [[20 + i] * (i % 3 + 1) + [1] for i in range(BATCH)], 24)
  loss, aux = fast_jit(lambda p, b: loss_fn(cfg, p, b), params, b)(params, b)
  lp_fn = lambda p, b: handle.token_logprobs(cfg, p, b["images"], b["tokens"],
                                             b["input_mask"], b["mask_ar"])
  lp = np.asarray(fast_jit(lp_fn, params, b)(params, b))
  answer = b["input_mask"] & (b["mask_ar"] == 1)
  assert int(aux["tokens"]) == answer.sum()
  np.testing.assert_allclose(float(loss), -lp[answer].mean(), rtol=1e-5)
  assert 0 <= float(aux["accuracy"]) <= 1 and np.isfinite(float(loss))


# ----------------------------------------------------------------------------
# Gradient accumulation.
# ----------------------------------------------------------------------------


def test_grad_accum_equals_one_big_batch(params0):
  batch = next(data_iter())
  counts = (batch["input_mask"] & (batch["mask_ar"] == 1)).sum(1)
  assert counts[0::2].sum() != counts[1::2].sum()   # microbatches of unequal weight
  out = {}
  for tcfg in (BASE, ACCUM):
    # Two steps on the same batch. The first has lr 0 (warm-up) and leaves
    # Adam's first moment = (1 - b1) * clipped gradient: the accumulated
    # gradient itself. The second applies an update through those moments.
    trainer = Trainer(CFG, tcfg)
    state, m_a = trainer.step(trainer.init_state(params0), batch)
    mu = {path_str(p).split("/", 1)[1]: np.asarray(v)     # "train/llm/..." -> "llm/..."
          for p, v in jax.tree_util.tree_leaves_with_path(state["opt_state"])
          if ".mu[" in jax.tree_util.keystr(p)}
    state, m_b = trainer.step(state, batch)
    out[tcfg.grad_accum] = flat_np(state["params"]), mu, (m_a, m_b)
  (p1, mu1, ms1), (p2, mu2, ms2) = out[1], out[2]
  for m1, m2 in zip(ms1, ms2):
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert m1["answer_tokens"] == m2["answer_tokens"] == counts.sum()
  assert len(mu1) == len(p1) and mu1.keys() == mu2.keys()     # one moment per param
  scale = max(np.abs(v).max() for v in mu1.values())
  for k in mu1:
    np.testing.assert_allclose(mu2[k], mu1[k], rtol=1e-4, atol=1e-6 * scale, err_msg=k)
  # The updates agree wherever the gradient is above float noise. (Adam turns
  # a gradient near 0, e.g. of SigLIP's key biases, which softmax ignores,
  # into a step of up to +-lr whatever its sign.)
  p0 = flat_np(params0)
  compared = total = 0
  for k in p1:
    sel = np.abs(mu1[k]) / (1 - BASE.b1) > 1e-6
    assert np.all(p1[k][sel] != p0[k][sel]), k
    np.testing.assert_allclose(p2[k][sel], p1[k][sel], rtol=0, atol=1e-6, err_msg=k)
    if k != "llm/embedder/input_embedding":    # (most token rows get no gradient)
      compared, total = compared + sel.sum(), total + sel.size
  assert compared > 0.9 * total, (compared, total)


def test_loss_slots_step_equals_the_full_vocabulary_step(params0):
  """TrainConfig.loss_slots projects onto the vocabulary only at each row's
  loss tokens: the same loss, accuracy and gradient as the full projection
  (rows of 1-3 answer tokens + <eos>, so 4 slots hold them all). The first
  step has lr 0 and leaves Adam's first moment = (1 - b1) * the gradient."""
  batch = next(data_iter())
  out = {}
  for slots in (0, 4):
    trainer = Trainer(CFG, dataclasses.replace(BASE, loss_slots=slots))
    state, m = trainer.step(trainer.init_state(params0), batch)
    mu = {path_str(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(state["opt_state"]) if ".mu[" in jax.tree_util.keystr(p)}
    out[slots] = mu, m
  (mu0, m0), (mu4, m4) = out[0], out[4]
  np.testing.assert_allclose(m4["loss"], m0["loss"], rtol=1e-6)
  np.testing.assert_allclose(m4["grad_norm"], m0["grad_norm"], rtol=1e-5)
  assert m0["answer_tokens"] == m4["answer_tokens"] and m0["accuracy"] == m4["accuracy"]
  assert mu0.keys() == mu4.keys() and len(mu0) > 10
  scale = max(np.abs(v).max() for v in mu0.values())
  for k in mu0:
    np.testing.assert_allclose(mu4[k], mu0[k], rtol=1e-4, atol=1e-6 * scale, err_msg=k)


def test_loss_slots_reject_a_row_with_more_loss_tokens(params0):
  from auditdm_jax.train.batches import loss_positions  # pylint: disable=import-outside-toplevel
  batch = next(data_iter())
  counts = (batch["input_mask"] & (batch["mask_ar"] == 1)).sum(1)
  pos = loss_positions(batch, 4)
  assert pos.shape == (BATCH, 4) and ((pos >= 0).sum(1) == counts).all()
  row = int(np.argmax(counts))
  assert (batch["mask_ar"][row][pos[row][pos[row] >= 0]] == 1).all()
  wide = loss_positions(batch, SEQ + 3)          # more slots than the rows' tokens
  assert wide.shape == (BATCH, SEQ + 3) and (wide[:, :4] == pos).all() and (wide[:, SEQ:] == -1).all()
  trainer = Trainer(CFG, dataclasses.replace(BASE, loss_slots=int(counts.max()) - 1))
  with pytest.raises(ValueError, match=r"loss tokens, more than TrainConfig.loss_slots"):
    trainer.step(trainer.init_state(params0), batch)
  with pytest.raises(ValueError, match="loss_slots must be an int >= 0"):
    dataclasses.replace(BASE, loss_slots=-1)


# ----------------------------------------------------------------------------
# Frozen vision tower; non-finite losses.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frozen_diverging(params0, tmp_path_factory):
  """A run with the vision tower frozen and an absurd lr: step 1 succeeds
  (checkpointed), later steps overflow to a non-finite loss."""
  workdir = tmp_path_factory.mktemp("frozen")
  tcfg = dataclasses.replace(BASE, frozen=(r"^img/",), lr=1e38, warmup_steps=0,
                             checkpoint_every=1, keep_checkpoints=None)
  with pytest.raises(NonFiniteLossError) as err:
    train(CFG, params0, data_iter(), tcfg, str(workdir))
  trainer = Trainer(CFG, tcfg)
  ck = ckpt_lib.TrainCheckpointer(str(workdir / "ckpt"), None, data_iter())
  state, meta = ck.restore(1, trainer.abstract_state(), trainer.opt_paths)
  ck.close()
  return tcfg, trainer, err.value, state, meta, workdir


def test_frozen_vision_tower_is_untouched_and_has_no_adam_state(frozen_diverging, params0):
  tcfg, _, _, state, meta, _ = frozen_diverging
  before, after = flat_np(params0), flat_np(state["params"])
  img = [k for k in before if k.startswith("img/")]
  assert img and all(np.array_equal(before[k], after[k]) for k in img)
  assert all(not np.array_equal(before[k], after[k]) for k in before if k.startswith("llm/"))
  # Adam moments exist for the LLM only: no optimizer memory for the tower.
  moments = [p for p in meta["opt_paths"] if ".mu[" in p or ".nu[" in p]
  assert moments and not any("'img'" in p for p in moments), moments
  n_llm = sum(v.size for k, v in before.items() if k.startswith("llm/"))
  opt_size = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
  assert opt_size <= 2 * n_llm + 4
  # The same holds for a freshly built optimizer.
  tx, mask, _ = make_optimizer(tcfg, params0)
  flat_mask = flax.traverse_util.flatten_dict(mask, sep="/")
  assert not any(v for k, v in flat_mask.items() if k.startswith("img/"))
  assert sum(x.size for x in jax.tree.leaves(jax.eval_shape(tx.init, params0))) == opt_size


def test_divergence_raises_naming_the_step_and_keeps_the_checkpoint(frozen_diverging):
  _, _, err, state, _, workdir = frozen_diverging
  msg = str(err)
  step = int(re.search(r"at step (\d+)", msg).group(1))
  assert step >= 2 and "non-finite" in msg and "step 1" in msg, msg
  assert isinstance(err, FloatingPointError)
  # The checkpoints before the bad step are complete and finite; none after.
  assert ckpt_steps(workdir) == list(range(1, step))
  assert int(state["step"]) == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
  assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == list(range(1, step))


def test_nan_params_raise_before_anything_is_saved(params0, tmp_path):
  bad = jax.tree.map(np.asarray, params0)
  bad["llm"]["final_norm"]["scale"] = np.full_like(bad["llm"]["final_norm"]["scale"], np.nan)
  with pytest.raises(NonFiniteLossError, match=r"at step 1: loss=nan.*no checkpoint"):
    train(CFG, bad, data_iter(), BASE, str(tmp_path))
  assert ckpt_steps(tmp_path) == []


# ----------------------------------------------------------------------------
# Resumption after SIGKILL.
# ----------------------------------------------------------------------------


def test_resume_after_sigkill_matches_uninterrupted_run(baseline, cache_dir, tmp_path):
  base_params, _, base_dir = baseline
  workdir, out = tmp_path / "run", tmp_path / "final.npz"
  env = subprocess_env(cache_dir)
  # A slow run (0.5 s per batch), killed once it has written a checkpoint.
  proc = subprocess.Popen(script("run", workdir, out, 0.5), env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 240
    while not ckpt_steps(workdir) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + (
        proc.stdout.read().decode()[-3000:])
    assert ckpt_steps(workdir), "no checkpoint within the deadline"
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  killed_at = ckpt_steps(workdir)[-1]
  assert killed_at < STEPS and not out.exists()
  # Restart: resumes from the checkpoint and finishes.
  done = subprocess.run(script("run", workdir, out), env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed"] and summary["start_step"] == killed_at
  final = dict(np.load(out))
  assert set(final) == set(base_params)
  for k, v in base_params.items():
    assert np.array_equal(final[k], v), k
  rows = read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  base_rows = read_metrics(base_dir / "metrics.jsonl")
  assert [r["loss"] for r in rows] == [r["loss"] for r in base_rows]


@pytest.mark.slow
def test_sigterm_saves_the_step_and_exits_cleanly(baseline, cache_dir, tmp_path):
  """SIGTERM (spot preemption) mid-run: the run saves a checkpoint at the step
  it is at, exits with status 143 and no traceback; a restart resumes there
  and ends where an uninterrupted run does."""
  base_params, _, _ = baseline
  workdir, out = tmp_path / "run", tmp_path / "final.npz"
  env = subprocess_env(cache_dir)
  proc = subprocess.Popen(script("run", workdir, out, 0.5), env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics = workdir / "metrics.jsonl"
  try:
    deadline = time.time() + 240
    while (not metrics.exists() or not read_metrics(metrics)) and proc.poll() is None \
        and time.time() < deadline:
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal"
    os.kill(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == 143, output[-3000:]
  assert "Traceback" not in output and "stopped by SIGTERM at step" in output, output[-3000:]
  stopped_at = ckpt_steps(workdir)[-1]
  assert 1 <= stopped_at < STEPS and not out.exists()
  assert read_metrics(metrics)[-1]["step"] == stopped_at
  done = subprocess.run(script("run", workdir, out), env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed"] and summary["start_step"] == stopped_at
  final = dict(np.load(out))
  for k, v in base_params.items():
    assert np.array_equal(final[k], v), k


class ListIterator:
  """A non-Grain iterator with JSON-able get_state / set_state."""

  def __init__(self, batches):
    self.batches, self.i = batches, 0

  def __next__(self):
    self.i += 1
    return self.batches[self.i - 1]

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def test_non_grain_iterators(params0, tmp_path):
  """Iterators with get_state/set_state are checkpointed as JSON; others run
  with a warning that their position is not saved."""
  it = data_iter()
  batches = [next(it) for _ in range(STEPS)]
  tcfg = dataclasses.replace(BASE, tensorboard=False)
  train(CFG, params0, ListIterator(batches), tcfg, str(tmp_path / "json"))
  saved = json.loads((tmp_path / "json" / "ckpt" / str(STEPS) / "data" / "metadata").read_text())
  assert saved == {"state": {"i": STEPS}, "bytes": False}
  restored = ListIterator(batches)
  train(CFG, None, restored, tcfg, str(tmp_path / "json"))    # resumes at the end
  assert restored.i == STEPS
  with pytest.warns(UserWarning, match="position is not checkpointed"):
    train(CFG, params0, iter(batches), tcfg, str(tmp_path / "plain"))
  with pytest.raises(ValueError, match="data iterator ran out after 3 steps"), \
       pytest.warns(UserWarning, match="not checkpointed"):
    train(CFG, params0, iter(batches[:3]), tcfg, str(tmp_path / "short"))


# ----------------------------------------------------------------------------
# Sharding.
# ----------------------------------------------------------------------------


def test_8_devices_match_1_device(params0, cache_dir, tmp_path):
  """data=2 x fsdp=2 x model=2 on 8 host devices vs this process's 1 device,
  with grad_accum=2 (microbatches sharded over data x fsdp); the sharded
  checkpoint restores onto the mesh."""
  out = tmp_path / "sharded.npz"
  proc = subprocess.run(script("sharded", tmp_path / "run8", out), env=subprocess_env(
      cache_dir, devices=8), cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "model" in res["q_spec"] and "fsdp" in res["q_spec"], res
  assert res["batch_spec"] == str(PartitionSpec(("data", "fsdp"), None)), res
  assert res["restored_equal"] and res["restored_spec"] == res["q_spec"], res
  one, _ = train(CFG, params0, data_iter(), SHARDED, str(tmp_path / "run1"))
  rows1 = read_metrics(tmp_path / "run1" / "metrics.jsonl")
  rows8 = read_metrics(tmp_path / "run8" / "metrics.jsonl")
  np.testing.assert_allclose([r["loss"] for r in rows8], [r["loss"] for r in rows1],
                             rtol=1e-4)
  np.testing.assert_allclose(rows8[0]["loss"], rows1[0]["loss"], rtol=1e-6)
  eight = dict(np.load(out))
  for k, v in flat_np(one).items():
    # SigLIP's key biases get float-noise gradients only (softmax ignores
    # them), which Adam scales up to random steps: nothing to compare there.
    if not k.endswith("key/bias"):
      np.testing.assert_allclose(eight[k], v, rtol=0, atol=1e-4, err_msg=k)


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "steps must be an int >= 1"),
    ("steps", 2.5, "steps must be an int"),
    ("lr", -1.0, "lr must be a finite number > 0"),
    ("lr", float("nan"), "lr must be a finite number > 0"),
    ("end_lr", 1.0, r"end_lr \(1.0\) must not exceed lr"),
    ("warmup_steps", 1.5, "warmup_steps as a float is a fraction"),
    ("warmup_steps", 20, r"warmup_steps must be in \[0, steps=12\]"),
    ("schedule", "exponential", "schedule must be one of"),
    ("b1", 1.0, r"b1 must be in \[0, 1\)"),
    ("grad_clip", -1.0, "grad_clip must be None or a number >= 0"),
    ("grad_accum", 0, "grad_accum must be an int >= 1"),
    ("checkpoint_every", 0, "checkpoint_every must be an int >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints must be None or an int >= 1"),
    ("log_every", True, "log_every must be an int >= 1"),
    ("frozen", "^img/", "frozen must be a tuple of regexes"),
    ("frozen", ("img/(",), "frozen: bad regex"),
    ("mesh", {"data": 0}, "mesh must map axis names to sizes"),
    ("rules", [["(", [None]]], "rules: partition rule 0: bad regex"),
    ("phrase_aux", -1.0, "phrase_aux must be a finite number >= 0"),
    ("phrase_classes", 1, "phrase_classes must be an int >= 2"),
])
def test_bad_train_config_is_rejected(field, value, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(BASE, **{field: value})


def test_bad_setups_are_rejected(params0):
  with pytest.raises(ValueError, match=r"frozen pattern '\^vision/' matches no parameter"):
    make_optimizer(dataclasses.replace(BASE, frozen=(r"^vision/",)), params0)
  with pytest.raises(ValueError, match="freezes every parameter"):
    make_optimizer(dataclasses.replace(BASE, frozen=(r".",)), params0)
  batch = next(data_iter())
  with pytest.raises(ValueError, match="not divisible by TrainConfig.grad_accum=3"):
    Trainer(CFG, dataclasses.replace(BASE, grad_accum=3)).step(None, batch)
  with pytest.raises(ValueError, match=r"lacks \['mask_ar'\]"):
    Trainer(CFG, BASE).step(None, {k: v for k, v in batch.items() if k != "mask_ar"})
  with pytest.raises(ValueError, match="more than seq_len=4"):
    sft_batch(CFG, batch["images"][:1], [[2, 3, 4]], [[5, 1]], 4)
  assert TrainConfig(steps=10, warmup_steps=0.25).warmup == 2   # round(2.5) == 2
  assert TrainConfig(mesh={"data": 2, "fsdp": -1}).mesh == (("data", 2), ("fsdp", -1))


# ----------------------------------------------------------------------------
# The phrase grounding loss (TrainConfig.phrase_aux).
# ----------------------------------------------------------------------------


def phrase_batch(batch):
  """The toy batch with one "phrase" per row: the prompt's last token, whose
  row / column targets are the brightness class's two bits (learnable from
  the image); every fourth row has none."""
  c = (np.asarray(batch["tokens"])[np.arange(BATCH), (np.asarray(batch["mask_ar"]) == 1)
                                   .argmax(1)] - 200)
  pos = (np.asarray(batch["mask_ar"]) == 1).argmax(1) - 1
  ph = -np.ones((BATCH, 2, 3), np.int32)
  ph[:, 0] = np.stack([pos, c // 2, c % 2], 1)
  ph[::4, 0] = -1
  return dict(batch, phrases=ph)


def test_phrase_aux_learns_its_heads_and_leaves_the_model_format(params0, tmp_path):
  batch = phrase_batch(next(data_iter()))
  tcfg = dataclasses.replace(BASE, phrase_aux=1.0, phrase_classes=2, eval_every=0)
  trainer = Trainer(CFG, tcfg)
  state = trainer.init_state(params0)
  assert set(flat_np(state["params"]["phrase_heads"])) == {"row", "col"}
  first = None
  for _ in range(8):
    state, m = trainer.step(state, batch)
    first = first if first is not None else m
  # zero heads: each of the two heads starts at ln 2
  np.testing.assert_allclose(first["phrase_loss"], 2 * np.log(2), rtol=1e-5)
  assert m["phrase_loss"] < 0.5 * first["phrase_loss"]
  # the reported loss is the answer NLL alone; the objective adds the term
  plain = Trainer(CFG, dataclasses.replace(tcfg, phrase_aux=0.0))
  _, m0 = plain.step(plain.init_state(params0), batch)
  np.testing.assert_allclose(first["loss"], m0["loss"], rtol=1e-5)
  assert "phrase_loss" not in m0
  # weight 0 ignores a phrases key; weight > 0 needs one
  with pytest.raises(ValueError, match=r"phrase_aux > 0 needs batch\['phrases'\]"):
    trainer.step(state, {k: v for k, v in batch.items() if k != "phrases"})
  with pytest.raises(ValueError, match=r"batch\['phrases'\] must be an int \[B=8, P, 3\]"):
    trainer.step(state, dict(batch, phrases=batch["phrases"][:, :, :2]))
  # train() returns (and exports) the model without the heads
  it = iter(grain.MapDataset.range(64).map(lambda i: phrase_batch(
      next(data_iter()))).to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                             prefetch_buffer_size=0)))
  params, summary = train(CFG, params0, it, dataclasses.replace(
      tcfg, steps=4, export_final=True), str(tmp_path))
  assert "phrase_heads" not in params and "phrase_loss" in summary["final"]
  assert set(flat_np(params)) == set(flat_np(params0))
  assert set(flat_np(models.load(str(tmp_path / "final")).params)) == set(flat_np(params0))


# ----------------------------------------------------------------------------
# Subprocess entry points.
# ----------------------------------------------------------------------------


def _main(argv):
  mode, workdir, out = argv[0], argv[1], argv[2]
  if mode == "run":                    # (resumable) BASE run, final params to OUT
    sleep = float(argv[3]) if len(argv) > 3 else 0.0
    params, _ = train(CFG, init_params(), data_iter(sleep), BASE, workdir)
    np.savez(out, **flat_np(params))
  elif mode == "sharded":              # SHARDED on data=2 x fsdp=2 x model=2
    assert jax.device_count() == 8, jax.device_count()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    params, _ = train(CFG, init_params(), data_iter(), SHARDED, workdir, mesh=mesh)
    flat = flat_np(params)
    np.savez(out, **flat)
    # Restoring the sharded checkpoint (nothing left to train) gives it back.
    again, summary = train(CFG, None, data_iter(), SHARDED, workdir, mesh=mesh)
    trainer = Trainer(CFG, SHARDED, mesh)
    batch_sh = trainer.batch_shardings(next(data_iter()))
    print(json.dumps({
        "q_spec": str(params["llm"]["layers"]["attn"]["q_einsum"]["w"].sharding.spec),
        "batch_spec": str(batch_sh["tokens"].spec),
        "restored_equal": summary["resumed"] and all(
            np.array_equal(v, flat[k]) for k, v in flat_np(again).items()),
        "restored_spec": str(again["llm"]["layers"]["attn"]["q_einsum"]["w"].sharding.spec)}))
  else:
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
  _main(sys.argv[1:])


# -- the one training loop (train/loop.py) -------------------------------------------


class _FakeCheckpointer:
  directory = "/fake/ckpt"

  def __init__(self):
    self.saved = []

  def save(self, step, state, meta):
    self.saved.append((step, state, meta["step"]))
    self.metas = getattr(self, "metas", {})
    self.metas[step] = meta

  def meta(self, step):
    return self.metas[step]


def test_loop_cadences_number_rows_and_checkpoints_by_update(tmp_path):
  from auditdm_jax.train import loop  # pylint: disable=import-outside-toplevel
  from auditdm_jax.train.metrics import read_metrics  # pylint: disable=import-outside-toplevel

  def step_fn(state, step):
    return loop.StepOut(state + 1, {"finite": True, "loss": 0.5, "grad_norm": 1.0},
                        {"loss": 0.5, "seen": step})

  ck = _FakeCheckpointer()
  cfg = loop.LoopConfig(steps=7, checkpoint_every=3, log_every=2, updates_per_step=2,
                        tensorboard=False, progress=False)
  logged = []
  res = loop.run(10, 1, cfg, step_fn, ck, str(tmp_path), {"m": 1},
                 extra_row=lambda s, step: {"eval/x": 1.0} if step == 5 else {},
                 on_log=lambda step, row: logged.append(step))
  assert res.state == 16 and res.step == 7 and res.last == {"loss": 0.5, "seen": 6}
  # loop steps 2..7 ran (resumed at 1); checkpoints at loop steps 3, 6 and the last
  assert [(s, st, m) for s, st, m in ck.saved] == [(6, 12, 6), (12, 15, 12), (14, 16, 14)]
  assert res.last_saved == 14
  rows = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [4, 8, 10, 12, 14]    # log cadence + the eval at 5
  assert [r.get("eval/x") for r in rows] == [None, None, 1.0, None, None]
  assert logged == [2, 4, 5, 6, 7]


def test_loop_resumed_at_its_last_step_reports_the_saved_row(tmp_path):
  """A run killed after its last checkpoint and before its outputs were written
  runs no step when restarted: its `last` is the row saved with that
  checkpoint (numpy scalars as numbers, non-finite as None), not {}."""
  from auditdm_jax.train import loop  # pylint: disable=import-outside-toplevel

  def step_fn(state, step):
    return loop.StepOut(state + 1, {"finite": True, "loss": 0.5, "grad_norm": 1.0},
                        {"loss": np.float32(0.25) + step, "n": np.int32(step),
                         "acc": float("inf"), "skip": [1]})

  ck = _FakeCheckpointer()
  cfg = loop.LoopConfig(steps=4, checkpoint_every=2, log_every=1, tensorboard=False,
                        progress=False)
  first = loop.run(0, 0, cfg, step_fn, ck, str(tmp_path / "a"), {})
  assert first.last["loss"] == np.float32(3.25)
  again = loop.run(4, 4, cfg, step_fn, ck, str(tmp_path / "a"), {}, last_saved=first.last_saved)
  assert again.step == 4 and again.last == {"loss": 3.25, "n": 3, "acc": None}
  assert len(ck.saved) == 2                         # nothing ran, nothing saved
  # with no checkpoint to read (a zero-step loop), nothing is made up
  assert loop.run(0, 0, loop.LoopConfig(steps=0, checkpoint_every=1, log_every=1,
                                        tensorboard=False, progress=False),
                  step_fn, ck, str(tmp_path / "b"), {}).last == {}


def test_loop_non_finite_step_raises_before_saving(tmp_path):
  from auditdm_jax.train import loop  # pylint: disable=import-outside-toplevel

  def step_fn(state, step):
    ok = step < 2
    return loop.StepOut(state + 1, {"finite": ok, "loss": 1.0 if ok else float("nan"),
                                    "grad_norm": 1.0}, {"loss": 1.0} if ok else {})

  ck = _FakeCheckpointer()
  cfg = loop.LoopConfig(steps=5, checkpoint_every=1, log_every=1, name="audit",
                        tensorboard=False, progress=False)
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"audit: non-finite loss at step 3.*checkpoint \(step 2\)"):
    loop.run(0, 0, cfg, step_fn, ck, str(tmp_path), {})
  assert [s for s, _, _ in ck.saved] == [1, 2]
  with pytest.raises(ValueError, match="LoopConfig.log_every must be an integer >= 1"):
    loop.LoopConfig(steps=1, checkpoint_every=1, log_every=0)
