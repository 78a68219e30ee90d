"""Full disks and unwritable paths (issue 19): a write that fails stops with an
OSError that names the path and keeps the errno, and leaves the previous
output intact and no temporary file behind. Each writer is covered: atomic
writes (every JSON output, stages.json, reports, journals), training
checkpoints, model saves, the exemplar store's chunks and publication, the
predictions journal, mine's chunk journal and the report.

Failures are injected (an OSError(ENOSPC) from fsync / write / flush, EROFS or
EACCES from mkstemp, a failing Orbax / TFDS call, a failing rename) and also
real: one subprocess writes under RLIMIT_FSIZE (a size limit the kernel
enforces, even for root: EFBIG), and a read-only directory (0o555; as root
the write runs in a subprocess that has dropped to the user `nobody`).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile

import ml_collections
import numpy as np
import pytest

from auditdm_jax.audit.diversity import DiversityConfig
from auditdm_jax.data import exemplars_tfds as store
from auditdm_jax.eval import predictions
from auditdm_jax.mine import journal as mine_journal
from auditdm_jax.models import presets
from auditdm_jax.models.ckpt import orbax_io
from auditdm_jax.report import html as report_html
from auditdm_jax.stages import report as report_stage
from auditdm_jax.train import ckpt as ckpt_lib
from auditdm_jax.utils import fileio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- helpers ------------------------------------------------------------------------

def snapshot(path) -> dict[str, bytes]:
  """{relative path: bytes} of every file under `path` (a file: {"": bytes})."""
  path = os.fspath(path)
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return {"": f.read()}
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def temp_files(path) -> list[str]:
  """Everything under `path` that looks like a writer's temporary."""
  out = []
  for root, dirs, files in os.walk(os.fspath(path)):
    for name in dirs + files:
      if name.endswith((".tmp", ".building", ".old")) or "orbax-checkpoint-tmp" in name:
        out.append(os.path.join(root, name))
  return out


def fail_fsync(monkeypatch, match: str, error: OSError = ENOSPC) -> list[str]:
  """Makes the fsync of every atomic write whose temporary file's name holds
  `match` raise `error` (the other writes go through); returns the names
  that failed."""
  real_mkstemp, real_fsync = tempfile.mkstemp, os.fsync
  names: dict[int, str] = {}
  failed: list[str] = []

  def mkstemp(*args, **kwargs):
    fd, name = real_mkstemp(*args, **kwargs)
    names[fd] = name
    return fd, name

  def fsync(fd):
    name = names.get(fd, "")
    if match in os.path.basename(name):
      failed.append(name)
      raise error
    return real_fsync(fd)

  monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
  monkeypatch.setattr(os, "fsync", fsync)
  return failed


class _FailingFile:
  """A file object whose `method` (write or flush) raises ENOSPC."""

  def __init__(self, f, method: str):
    self._f, self._method = f, method

  def __getattr__(self, name):
    if name == self._method:
      def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return fail
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def assert_clear(err: BaseException, path, code: int = errno.ENOSPC) -> None:
  """The error names `path`, says the previous output is intact, keeps errno."""
  assert isinstance(err, OSError), repr(err)
  assert err.errno == code, repr(err)
  assert os.fspath(path) in str(err), str(err)
  assert "intact" in str(err), str(err)
  assert err.__cause__ is not None


# -- atomic writes (every JSON output, stages.json, reports, journals) -------------

@pytest.mark.parametrize("where", ["write", "flush", "fsync"])
def test_atomic_write_enospc_keeps_the_previous_file(tmp_path, monkeypatch, where):
  path = tmp_path / "out.json"
  fileio.atomic_write_text(path, '{"old": 1}')
  before = snapshot(tmp_path)
  if where == "fsync":
    fail_fsync(monkeypatch, "out.json")
  else:
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen",
                        lambda fd, *a, **k: _FailingFile(real_fdopen(fd, *a, **k), where))
  with pytest.raises(OSError) as err:
    fileio.atomic_write_text(path, '{"new": 2}' * 1000)
  assert_clear(err.value, path)
  assert "no temporary file was left" in str(err.value)
  assert snapshot(tmp_path) == before          # old bytes, no temporary file
  monkeypatch.undo()
  fileio.atomic_write_text(path, '{"new": 2}')  # a rerun writes it
  assert path.read_text() == '{"new": 2}' and sorted(os.listdir(tmp_path)) == ["out.json"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_atomic_write_unwritable_directory_is_named(tmp_path, monkeypatch, code):
  path = tmp_path / "stages.json"
  fileio.atomic_write_text(path, "{}")

  def mkstemp(*args, **kwargs):
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
  with pytest.raises(OSError) as err:
    fileio.atomic_write_text(path, '{"x": 1}')
  assert_clear(err.value, path, code)
  if code == errno.EACCES:
    assert isinstance(err.value, PermissionError)   # the errno's subclass survives
  assert snapshot(tmp_path) == {"stages.json": b"{}"}


_READ_ONLY = r'''
import json, os, sys
from auditdm_jax.utils import fileio
if len(sys.argv) > 2:          # root: drop to an unprivileged user once imported
  os.setgroups([])
  os.setgid(int(sys.argv[3]))
  os.setuid(int(sys.argv[2]))
try:
  fileio.atomic_write_text(sys.argv[1], "new")
  print("RESULT " + json.dumps({"error": None}))
except OSError as e:
  print("RESULT " + json.dumps({"error": {"type": type(e).__name__, "errno": e.errno,
                                          "msg": str(e)}}))
'''


def test_atomic_write_real_read_only_directory(tmp_path):
  """A directory the writer may not write to, for real: chmod 0o500 as an
  ordinary user; as root (who may write anywhere) the write runs in a
  subprocess that drops to the unprivileged user `nobody` once it has
  imported the writer, in a root-owned 0o555 directory."""
  base = tempfile.mkdtemp(prefix="ro_", dir="/tmp" if os.path.isdir("/tmp") else None)
  try:
    os.chmod(base, 0o755)
    d = os.path.join(base, "ro")
    os.mkdir(d)
    path = os.path.join(d, "eval.json")
    fileio.atomic_write_text(path, "old")
    os.chmod(path, 0o644)
    os.chmod(d, 0o555)
    if os.geteuid() != 0:
      with pytest.raises(OSError) as err:
        fileio.atomic_write_text(path, "new")
      assert_clear(err.value, path, errno.EACCES)
    else:
      import pwd  # pylint: disable=import-outside-toplevel
      try:
        nobody = pwd.getpwnam("nobody")
      except KeyError:
        pytest.skip("running as root and there is no user 'nobody' to drop to")
      env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", HOME=base)
      proc = subprocess.run([sys.executable, "-c", _READ_ONLY, path, str(nobody.pw_uid),
                             str(nobody.pw_gid)], env=env, cwd=base, capture_output=True,
                            text=True, timeout=120, check=False)
      lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
      assert proc.returncode == 0 and lines, proc.stderr[-4000:]
      e = json.loads(lines[-1][len("RESULT "):])["error"]
      assert e is not None, "the unprivileged write into a 0o555 directory succeeded"
      assert e["type"] == "PermissionError" and e["errno"] == errno.EACCES, e
      assert path in e["msg"] and "intact" in e["msg"], e["msg"]
    assert os.listdir(d) == ["eval.json"]
    with open(path) as f:
      assert f.read() == "old"
  finally:
    for root, dirs, _ in os.walk(base):
      for x in dirs:
        os.chmod(os.path.join(root, x), 0o700)
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(base, ignore_errors=True)


def test_write_failed_keeps_tensorstore_errno():
  e = ValueError("OUT_OF_RANGE: Failed writing: \"/x/d/ab\": No space left on device "
                 "[os_error_code='28']")
  out = fileio.write_failed(e, "saving /x failed", "the previous /x is intact")
  assert isinstance(out, OSError) and out.errno == errno.ENOSPC
  assert str(out).startswith("[Errno 28] saving /x failed: ValueError: OUT_OF_RANGE")
  assert isinstance(fileio.write_failed(KeyError("k"), "w", "k"), RuntimeError)
  plain = fileio.write_failed(OSError("disk full"), "w", "k")
  assert type(plain) is OSError and str(plain) == "w: disk full; k"


# -- training checkpoints (Orbax CheckpointManager) --------------------------------

def _train_state(value: float, n: int = 8) -> dict:
  return {"params": {"w": np.full((n,), value, np.float32)},
          "opt_state": (np.full((n,), value + 1, np.float32),),
          "rng": np.zeros((2,), np.uint32), "step": np.asarray(int(value), np.int32)}


def _train_restore(ck, step: int, n: int = 8):
  import jax  # pylint: disable=import-outside-toplevel
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _train_state(0, n))
  _, paths = ckpt_lib.flatten_opt_state(abstract["opt_state"])
  state, meta = ck.restore(step, abstract, paths)
  return np.asarray(state["params"]["w"]), meta


def _train_meta(step: int) -> dict:
  _, paths = ckpt_lib.flatten_opt_state(_train_state(0)["opt_state"])
  return {"step": step, "opt_paths": paths, "data_mode": ckpt_lib.DATA_NONE}


# Orbax's save threads report the injected failure once more on a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_train_checkpoint_failed_save_keeps_the_previous_step(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = str(tmp_path / "ckpt")
  ck = ckpt_lib.TrainCheckpointer(directory, 2, iter([]))
  ck.save(1, _train_state(1.0), _train_meta(1))
  ck.save(2, _train_state(2.0), _train_meta(2))
  before = snapshot(directory)
  handler = ocp.handlers.JsonCheckpointHandler
  assert hasattr(handler, "_save_fn"), "Orbax changed: inject the failure elsewhere"

  async def full_disk(self, x, directory):   # the meta item's write: after the arrays
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(handler, "_save_fn", full_disk)
  with pytest.raises(OSError) as err:
    ck.save(3, _train_state(3.0), _train_meta(3))
  assert_clear(err.value, directory)
  assert "step 3" in str(err.value) and "previous checkpoint (step 2)" in str(err.value)
  assert temp_files(directory) == []            # the unfinished step 3 was removed
  assert snapshot(directory) == before          # steps 1 and 2 untouched (max_to_keep=2)
  assert ck.all_steps() == [1, 2]
  monkeypatch.undo()
  w, meta = _train_restore(ck, 2)
  np.testing.assert_array_equal(w, _train_state(2.0)["params"]["w"])
  assert meta["step"] == 2
  ck.close()
  again = ckpt_lib.TrainCheckpointer(directory, 2, iter([]))   # a restart resumes at 2
  assert again.latest_step() == 2
  again.save(3, _train_state(3.0), _train_meta(3))
  assert again.all_steps() == [2, 3]
  again.close()


# -- model saves (our Orbax format) -----------------------------------------------

def _model_params(value: float) -> dict:
  return {"llm": {"w": np.full((4, 3), value, np.float32)},
          "img": {"b": np.arange(5, dtype=np.float32) + value}}


@pytest.mark.parametrize("where", ["params", "tokenizer", "marker", "rename"])
def test_model_save_failure_keeps_the_previous_model(tmp_path, monkeypatch, where):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  cfg = presets.tiny_paligemma2()
  tok = tmp_path / "tok.model"
  tok.write_bytes(b"sentencepiece")
  path = str(tmp_path / "models" / "target")
  orbax_io.save_native(path, cfg, _model_params(1.0), str(tok))
  before = snapshot(tmp_path / "models")
  if where == "params":          # TensorStore's own error, errno in its message
    def save(self, *args, **kwargs):
      raise ValueError("OUT_OF_RANGE: Failed writing: No space left on device "
                       "[os_error_code='28']")
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)
  elif where == "tokenizer":     # the params are in the temporary directory by now
    def copyfile(*args, **kwargs):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(orbax_io.shutil, "copyfile", copyfile)
  elif where == "marker":
    fail_fsync(monkeypatch, orbax_io.NATIVE_MARKER)
  else:                          # the previous model moved aside, the new one cannot move in
    real_replace = os.replace

    def replace(src, dst):
      if os.fspath(dst) == path and os.fspath(src).endswith(".tmp"):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
      return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
  with pytest.raises(OSError) as err:
    orbax_io.save_native(path, cfg, _model_params(2.0), str(tok))
  assert_clear(err.value, path, errno.EROFS if where == "rename" else errno.ENOSPC)
  monkeypatch.undo()
  assert temp_files(tmp_path) == []
  assert snapshot(tmp_path / "models") == before
  _, flat, tok_path = orbax_io.read_native(path)
  np.testing.assert_array_equal(flat["llm/w"], _model_params(1.0)["llm"]["w"])
  np.testing.assert_array_equal(flat["img/b"], _model_params(1.0)["img"]["b"])
  assert tok_path and open(tok_path, "rb").read() == b"sentencepiece"


# -- the exemplar store: journal chunks and publication ----------------------------

def _record(i: int, failed=("t_small",)) -> dict:
  img = np.full((8, 8, 3), i % 256, np.uint8)
  return {"id": f"id{i:04d}", "pairing": "edit", "route": "edit",
          "auditor_text": f"add a red circle <{i}>", "auditor_text2": "",
          "question": "what colour is the circle?", "pseudo_label": "red",
          "answers": {"ref_a": "red", "t_small": "blue"}, "failed": list(failed),
          "skill": "colour", "factor": "added", "category": "colour: red", "context": "",
          "auditor": "auditor_trained", "auditor_step": 7, "seed_index": i,
          "seed_image": img, "image": 255 - img}


def _ids(path: str) -> dict[str, list[str]]:
  return {s: [store.data_source(path, s)[i]["id"] for i in range(len(store.data_source(path, s)))]
          for s in store.SPLITS}


def test_store_chunk_write_failure_keeps_earlier_chunks(tmp_path, monkeypatch):
  chunks = str(tmp_path / "chunks")
  store.write_chunk(store.chunk_path(chunks, "aud", 0), [_record(0)])
  before = snapshot(chunks)
  fail_fsync(monkeypatch, "aud-00001")
  path = store.chunk_path(chunks, "aud", 1)
  with pytest.raises(OSError) as err:
    store.write_chunk(path, [_record(1), _record(2)])
  assert_clear(err.value, path)
  assert snapshot(chunks) == before and not os.path.exists(path)
  assert [r["id"] for r in store.iter_chunks(chunks)] == ["id0000"]


def test_store_publish_failure_keeps_the_published_store(tmp_path, monkeypatch):
  chunks, data_dir = str(tmp_path / "chunks"), str(tmp_path / "tfds")
  store.write_chunk(store.chunk_path(chunks, "aud", 0), [_record(0), _record(1, failed=())])
  path = store.publish(chunks, data_dir)
  before, ids = snapshot(data_dir), _ids(path)
  assert ids == {"exemplars": ["id0000"], "pseudo_labelled": ["id0001"]}
  store.write_chunk(store.chunk_path(chunks, "aud", 1), [_record(2), _record(3)])

  # 1. The build fails half-way (TFDS writing its array_record files).
  real_generate = store.AuditdmExemplars._generate_examples   # pylint: disable=protected-access

  def generate(self, split):
    for n, example in enumerate(real_generate(self, split)):
      if n == 1:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      yield example

  monkeypatch.setattr(store.AuditdmExemplars, "_generate_examples", generate)
  with pytest.raises(OSError) as err:
    store.publish(chunks, data_dir)
  assert_clear(err.value, data_dir)
  assert temp_files(tmp_path) == [] and snapshot(data_dir) == before
  assert _ids(path) == ids
  monkeypatch.undo()

  # 2. The build succeeds but the new store cannot be renamed into place: the
  #    previous one is moved back and the build removed.
  real_replace = os.replace

  def replace(src, dst):
    if os.fspath(src).endswith(".building"):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", replace)
  with pytest.raises(OSError) as err:
    store.publish(chunks, data_dir)
  monkeypatch.undo()
  assert_clear(err.value, data_dir, errno.EROFS)
  assert temp_files(tmp_path) == [] and snapshot(data_dir) == before
  assert _ids(path) == ids

  # 3. A corrupt chunk is not a write failure: its error passes through, the
  #    build directory is removed, the store stays.
  bad = os.path.join(chunks, "aud-00009.jsonl")
  with open(bad, "w") as f:
    f.write('{"id": "half a line\n')
  with pytest.raises(ValueError, match="corrupt exemplar chunk"):
    store.publish(chunks, data_dir)
  os.unlink(bad)
  assert temp_files(tmp_path) == [] and snapshot(data_dir) == before

  # 4. A rerun publishes every chunk.
  path = store.publish(chunks, data_dir)
  assert _ids(path) == {"exemplars": ["id0000", "id0002", "id0003"],
                        "pseudo_labelled": ["id0001"]}
  assert sorted(os.listdir(tmp_path)) == ["chunks", "tfds"]


# -- mine's chunk journal ------------------------------------------------------------

class _Auditing:
  diversity = DiversityConfig()             # plain: one generic group per seed

  def run(self, seeds, pairings, key, num_samples, descriptors=None):
    del pairings, key, num_samples, descriptors
    return seeds


class _Pool:
  def get(self, idx):
    return list(idx)


def test_mine_chunk_write_failure_keeps_earlier_chunks_and_resumes(tmp_path, monkeypatch):
  chunks = str(tmp_path / "mine" / "chunks")
  mined_chunks: list[int] = []

  def probe_records(roll, seeds, idx, k, *args, **kwargs):
    mined_chunks.append(idx[0] // 2)
    return [_record(i) for i in idx]

  monkeypatch.setattr(mine_journal, "probe_records", probe_records)
  monkeypatch.setattr(mine_journal.rollout_lib, "draw_pairings", lambda *a: None)
  mine = lambda: mine_journal.mine_chunks(  # noqa: E731
      {"aud": object()}, lambda name, vlm: _Auditing(), _Pool(), chunks, mixture=None,
      samples_per_seed=1, chunk_seeds=2, n_seeds=8, seed=0, targets=("t_small",),
      refs=("ref_a",), focus="t_small", consensus="all", editor=None,
      auditor_steps={"aud": 7})
  with monkeypatch.context() as m:
    failed = fail_fsync(m, "aud-00002")
    with pytest.raises(OSError) as err:
      mine()
    assert len(failed) == 1
  path = store.chunk_path(chunks, "aud", 2)
  assert_clear(err.value, path)
  assert mined_chunks == [0, 1, 2]
  assert sorted(os.listdir(chunks)) == ["aud-00000.jsonl", "aud-00001.jsonl"]
  before = snapshot(chunks)
  mined_chunks.clear()
  assert mine() == 2                      # the rerun mines chunks 2 and 3 only
  assert mined_chunks == [2, 3]
  after = snapshot(chunks)
  assert {k: after[k] for k in before} == before
  assert [r["id"] for r in store.iter_chunks(chunks)] == [f"id{i:04d}" for i in range(8)]


# -- the predictions journal --------------------------------------------------------

def test_predictions_chunk_failure_keeps_earlier_chunks_and_resumes(tmp_path, monkeypatch):
  jr = predictions.Journal(str(tmp_path / "predictions"), "fp0123", "bench",
                           {"greedy": True})
  records = [{"id": str(i), "prompt": f"question {i}"} for i in range(6)]
  asked: list[str] = []

  def generate(batch):
    asked.extend(r["id"] for r in batch)
    return [f"answer {r['id']}" for r in batch]

  with monkeypatch.context() as m:
    fail_fsync(m, "chunk-000001")
    with pytest.raises(OSError) as err:
      predictions.predict(jr, records, generate, chunk=2)
  assert_clear(err.value, os.path.join(jr.dir, "chunk-000001.jsonl"))
  assert sorted(os.listdir(jr.dir)) == ["chunk-000000.jsonl", "settings.json"]
  before = snapshot(jr.dir)
  asked.clear()
  preds, new = predictions.predict(jr, records, generate, chunk=2)
  assert preds == [f"answer {i}" for i in range(6)]
  assert new == 4 and asked == ["2", "3", "4", "5"]   # chunk 0 came from the journal
  after = snapshot(jr.dir)
  assert {k: after[k] for k in before} == before
  assert set(predictions.count_ids(jr.lines()).values()) == {1}


# -- the report ---------------------------------------------------------------------

def test_report_html_write_failure_keeps_the_previous_report(tmp_path, monkeypatch):
  path = tmp_path / "report.html"
  report_html.write(path, {"title": "first"})
  before = snapshot(tmp_path)
  fail_fsync(monkeypatch, "report.html")
  with pytest.raises(OSError) as err:
    report_html.write(path, {"title": "second"})
  assert_clear(err.value, path)
  assert snapshot(tmp_path) == before


def test_report_stage_write_failure_keeps_the_previous_outputs(tmp_path, monkeypatch):
  wd = str(tmp_path)
  config = ml_collections.ConfigDict({"models": {}})
  with open(os.path.join(wd, "mine.json"), "w") as f:
    json.dump({"target": "t_small"}, f)
  report_stage.run(config, wd)
  before = snapshot(tmp_path)
  with open(os.path.join(wd, "mine.json"), "w") as f:   # the next report would differ
    json.dump({"target": "t_large"}, f)
  before["mine.json"] = snapshot(os.path.join(wd, "mine.json"))[""]
  fail_fsync(monkeypatch, "report.html")
  with pytest.raises(OSError) as err:
    report_stage.run(config, wd)
  assert_clear(err.value, os.path.join(wd, "report.html"))
  assert snapshot(tmp_path) == before          # report.html and report.json both kept
  monkeypatch.undo()
  report_stage.run(config, wd)                 # a rerun writes both
  assert "t_large" in open(os.path.join(wd, "report.html")).read()


# -- real failures: a size-limited process (RLIMIT_FSIZE) --------------------------

_SIZE_LIMITED = r'''
import errno, json, os, resource, signal, sys
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG
from auditdm_jax.models import presets
from auditdm_jax.models.ckpt import orbax_io
from auditdm_jax.train import ckpt as ckpt_lib
from auditdm_jax.utils import fileio

root = sys.argv[1]
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
LIMIT = 64 * 1024

def limited(fn):
  resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
  try:
    fn()
    return None
  except Exception as e:
    return {"type": type(e).__name__, "errno": getattr(e, "errno", None), "msg": str(e)}
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

def listing(path):
  return sorted(os.path.relpath(os.path.join(r, n), path)
                for r, ds, fs in os.walk(path) for n in ds + fs)

out = {}
# atomic_write
path = os.path.join(root, "out.json")
fileio.atomic_write_text(path, "old")
out["atomic"] = {"error": limited(lambda: fileio.atomic_write_text(path, "x" * 200_000)),
                 "content": open(path).read(), "listing": listing(root)}
# the training checkpointer
def state(v, n):   # n > 8: random, so that compression cannot fit it under the limit
  w = np.full((n,), v, np.float32) if n <= 8 else np.random.default_rng(0).random(n, np.float32)
  return {"params": {"w": w}, "opt_state": (np.zeros((n,), np.float32),),
          "rng": np.zeros((2,), np.uint32), "step": np.asarray(int(v), np.int32)}
_, paths = ckpt_lib.flatten_opt_state(state(0, 8)["opt_state"])
meta = lambda s: {"step": s, "opt_paths": paths, "data_mode": "none"}
d = os.path.join(root, "ckpt")
ck = ckpt_lib.TrainCheckpointer(d, None, iter([]))
ck.save(1, state(1.0, 8), meta(1))
before = listing(d)
err = limited(lambda: ck.save(2, state(2.0, 100_000), meta(2)))
after_fail = listing(d)
import jax
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(0, 8))
restored, m = ck.restore(1, abstract, paths)
ck.save(2, state(2.0, 100_000), meta(2))   # the rerun, with room again
out["ckpt"] = {"error": err, "listing_same": after_fail == before,
               "steps_after_rerun": ck.all_steps(), "restored": restored["params"]["w"].tolist(),
               "directory": ck.directory}
ck.close()
# a model save
cfg = presets.tiny_paligemma2()
mpath = os.path.join(root, "models", "m")
orbax_io.save_native(mpath, cfg, {"llm": {"w": np.ones((4,), np.float32)}})
mbefore = listing(os.path.join(root, "models"))
err = limited(lambda: orbax_io.save_native(
    mpath, cfg, {"llm": {"w": np.random.default_rng(1).random(100_000, np.float32)}}))
_, flat, _ = orbax_io.read_native(mpath)
out["model"] = {"error": err, "listing_same": listing(os.path.join(root, "models")) == mbefore,
                "w": flat["llm/w"].tolist()}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def size_limited(tmp_path_factory):
  """What the writers did in a process whose files may not grow past 64 KiB."""
  resource = pytest.importorskip("resource")
  if not hasattr(resource, "RLIMIT_FSIZE"):
    pytest.skip("no RLIMIT_FSIZE on this platform")
  root = tmp_path_factory.mktemp("size_limited")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _SIZE_LIMITED, str(root)], env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  return root, json.loads(lines[-1][len("RESULT "):])


def test_real_size_limit_atomic_write(size_limited):
  root, out = size_limited
  a = out["atomic"]
  assert a["error"]["errno"] == errno.EFBIG
  assert os.path.join(str(root), "out.json") in a["error"]["msg"]
  assert "intact" in a["error"]["msg"]
  assert a["content"] == "old" and a["listing"] == ["out.json"]


def test_real_size_limit_train_checkpoint(size_limited):
  _, out = size_limited
  c = out["ckpt"]
  assert c["error"]["type"] == "OSError" and c["error"]["errno"] == errno.EFBIG, c["error"]
  assert c["directory"] in c["error"]["msg"] and "step 2" in c["error"]["msg"]
  assert "previous checkpoint (step 1)" in c["error"]["msg"]
  assert c["restored"] == [1.0] * 8
  assert c["listing_same"] and c["steps_after_rerun"] == [1, 2]


def test_real_size_limit_model_save(size_limited):
  root, out = size_limited
  m = out["model"]
  assert m["error"]["errno"] == errno.EFBIG, m["error"]
  assert os.path.join(str(root), "models", "m") in m["error"]["msg"]
  assert m["listing_same"] and m["w"] == [1.0] * 4
