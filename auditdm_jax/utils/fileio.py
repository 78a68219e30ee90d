"""Atomic file writes: write beside the target, fsync, then rename over it.

A crash mid-write leaves either the old file or the new one, never a torn one;
a failed write (a full disk, a read-only directory) leaves the old one and no
temporary file, and raises an OSError naming the path (`write_failed` words
the same errors for the other writers: checkpoints, model saves, the store).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile

from auditdm_jax.utils import chaos


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def error_code(e: BaseException) -> int | None:
  """The errno of a failed write: an OSError's, or the one TensorStore (Orbax's
  array writer) puts in its messages ("[os_error_code='28']"); None if none."""
  if isinstance(e, OSError):
    return e.errno
  m = _OS_ERROR_CODE.search(str(e))
  return int(m.group(1)) if m else None


def write_failed(e: BaseException, what: str, kept: str) -> Exception:
  """The error to raise (`from e`) for a failed write: "<what>: <reason>;
  <kept>". what: the write that failed, naming its path; kept: what is left
  intact. An OSError with e's errno (error_code: ENOSPC / EACCES / EROFS
  survive, and with them OSError's subclasses such as PermissionError);
  without an errno, an OSError for an OSError, else a RuntimeError."""
  if isinstance(e, OSError):
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename and e.strerror and str(e.filename) not in what:
      reason = f"{reason}: {e.filename}"
  else:
    reason = f"{type(e).__name__}: {e}"
  text = f"{what}: {reason}; {kept}"
  code = error_code(e)
  if code is not None:
    return OSError(code, text)
  return OSError(text) if isinstance(e, OSError) else RuntimeError(text)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
  """Yields a file object; on clean exit it atomically replaces `path`.

  A failed write (ENOSPC from write / flush / fsync, EACCES / EROFS from a
  read-only directory, ...) removes the temporary file and raises an OSError
  with the original errno whose message names `path` and says that the
  previous file there is untouched; the original error is its __cause__."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
      f = os.fdopen(fd, mode)
    except BaseException:
      os.close(fd)
      raise
    with f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    chaos.point("atomic_write")
    os.replace(tmp, path)
  except BaseException as e:
    left = False
    if tmp is not None:
      try:
        os.unlink(tmp)
      except FileNotFoundError:
        pass
      except OSError:
        left = True
    if isinstance(e, OSError):
      tmp_note = (f"the temporary {tmp} could not be removed" if left
                  else "no temporary file was left")
      raise write_failed(e, f"cannot write {path}",
                         f"the previous {path} (if any) is intact, {tmp_note}") from e
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_write(path, "w") as f:
    f.write(text)


def replace_dir(tmp: str, path: str, moved_aside: str | None = None) -> None:
  """Moves the finished directory `tmp` to `path` in one rename. An existing
  `path` is first moved aside to `<path>.old` (chaos point `moved_aside`, when
  named) and removed only afterwards; if tmp cannot be moved in it is moved
  back. A stale `<path>.old` from an interrupted earlier call is removed first."""
  path = os.path.abspath(path)
  old = path + ".old"
  if os.path.exists(old):
    shutil.rmtree(old)
  moved = False
  if os.path.exists(path):
    os.replace(path, old)
    moved = True
    if moved_aside:
      chaos.point(moved_aside)
  try:
    os.replace(tmp, path)
  except BaseException:
    if moved:
      os.replace(old, path)
    raise
  if moved:
    shutil.rmtree(old, ignore_errors=True)


# -- remote paths (gs://, and any other fsspec URL) -----------------------------------

def is_remote(path: str | os.PathLike) -> bool:
  """A URL such as gs://bucket/x (anything with a scheme); local paths are not."""
  return "://" in os.fspath(path)


def filesystem(url: str):
  """(fsspec filesystem, path inside it) for a URL; a missing protocol package
  (gcsfs for gs://) is named."""
  import fsspec  # pylint: disable=import-outside-toplevel
  try:
    return fsspec.core.url_to_fs(url)
  except ImportError as e:
    proto = url.split("://", 1)[0]
    hint = " (pip install gcsfs, or the package's [tpu] extra)" if proto in ("gs", "gcs") else ""
    raise RuntimeError(f"cannot read {url}: no filesystem for {proto}://{hint}: {e}") from e
  except ValueError as e:
    raise RuntimeError(f"cannot read {url}: no filesystem for {url.split('://', 1)[0]}:// "
                       f"({e})") from e


def exists(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.exists(os.path.expanduser(path))
  fs, p = filesystem(path)
  return fs.exists(p)


def open_read(path: str | os.PathLike, mode: str = "rb"):
  """A file object for reading a local path or a URL."""
  path = os.fspath(path)
  if not is_remote(path):
    return open(os.path.expanduser(path), mode)  # noqa: SIM115
  fs, p = filesystem(path)
  return fs.open(p, mode)


def join(base: str, *parts: str) -> str:
  if is_remote(base):
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(base, *parts)


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get("AUDITDM_CACHE", "~/.cache/auditdm"))


def stage(url: str, extra: tuple[str, ...] = ()) -> str:
  """A local copy of a remote file or directory (under $AUDITDM_CACHE,
  default ~/.cache/auditdm), made once: copied beside its place and renamed,
  so an interrupted copy is never taken for a finished one. `extra`: sibling
  files (names beside `url`) copied along when they exist, such as a
  tokenizer. Local paths are returned unchanged."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  if not is_remote(url):
    return url
  name = url.rstrip("/").rsplit("/", 1)[-1]
  root = os.path.join(cache_dir(), "staged", hashlib.sha1(url.encode()).hexdigest()[:16])
  local = os.path.join(root, name)
  if os.path.exists(local):   # staged before (a URL is taken to name fixed content)
    return local
  fs, p = filesystem(url)
  if not fs.exists(p):
    raise FileNotFoundError(f"{url} does not exist")
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".staging.", dir=root)
  try:
    if fs.isdir(p):
      fs.get(p.rstrip("/") + "/", os.path.join(tmp, name), recursive=True)
    else:
      fs.get(p, os.path.join(tmp, name))
      parent = p.rstrip("/").rsplit("/", 1)[0]
      for sib in extra:
        if fs.exists(f"{parent}/{sib}"):
          fs.get(f"{parent}/{sib}", os.path.join(tmp, sib))
    for entry in os.listdir(tmp):
      if not os.path.exists(os.path.join(root, entry)):
        os.replace(os.path.join(tmp, entry), os.path.join(root, entry))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return local
