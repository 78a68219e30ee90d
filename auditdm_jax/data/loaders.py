"""Grain input pipelines over random-access sources (grain 0.2.x Dataset API).

A source is anything with `__len__` and `__getitem__` returning a record (a
dict of numpy-friendly values): `scenes.tfds.data_source(...)`, or a plain list
in tests.

Training (`train_loader`), built from grain.MapDataset / IterDataset:

    keys = MapDataset.range(shard).shuffle(seed).repeat(num_epochs)  # record ids
    chunks = keys.map_with_index(...)[position:].batch(batch_size)   # id chunks
           .map(LoadChunk)     # read, transform, filter, stack: a "pre-batch"
           .to_iter_dataset(read_options).mp_prefetch(worker_count)
    TrainIterator: re-batches pre-batches into exact `batch_size` batches.

  * shard_mode="records" (the default): every process reads its own
    contiguous shard of the records (JAX process index / count, or explicit
    grain ShardOptions; drop_remainder=True gives all processes the same
    number of records per epoch), and reshuffles it every epoch (grain's
    ShuffleMapDataset: seed + epoch);
  * shard_mode="batch_rows": every process walks the same shuffled order of
    all the records, cut into global batches of batch_size x process_count
    records, and reads only its rows of each (process p: rows
    [p * batch_size, (p + 1) * batch_size)). The global batches, and the
    RandomMap draws, are then those of a 1-process run with the global batch
    size, whatever the number of processes (without Filter transforms);
  * a record is identified by its position in this stream, which also seeds
    its RNG for RandomMap transforms; Filter transforms drop records, which is
    why a pre-batch may be short and TrainIterator re-batches;
  * the iterator state is that position (plus the pipeline's identity), so a
    checkpoint restores exactly, whatever the chunking or worker count.

Why not grain.DataLoader (checked in grain 0.2.18): its workers each take every
worker_count-th record and batch them inside the worker, so batches change
with worker_count; its checkpoint state refuses a different worker_count;
and making it worker-invariant means shipping single records between
processes (265 records/s with 2 workers). Here a worker ships whole
pre-batches, mp_prefetch's round robin over the workers keeps chunk order,
and the batches are the same for every worker_count (tested). Chunks are also
read with one batched `__getitems__` call. Measured on a busy 2-core box,
scene_vqa train split, 64-record batches: DataLoader + Batch 424 (0 workers)
/ 741 (2 workers) records/s; train_loader 1790 / 2227 records/s.

Checkpointing (Orbax): the iterator goes into a CheckpointManager next to the
other items through Grain's handler (`grain.checkpoint.CheckpointSave` /
`CheckpointRestore`; also `grain.python.PyGrainCheckpointSave` / `Restore`),
which writes one `process_<i>-of-<n>.json` per JAX process:

    it = train_loader(source, batch_size=32, seed=0)
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), data=save_args(it)))
    ...
    it = train_loader(source, batch_size=32, seed=0)      # same arguments
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), data=restore_args(it)))
    # `it` (also restored["data"]) continues after the saved batch.

absl flags: Grain reads its settings from absl flags when it starts worker
processes ("spawn"), and raises UnparsedFlagAccessError if nothing parsed
them. Programs run through `absl.app.run` are fine; elsewhere (tests,
notebooks, scripts) `train_loader` calls `flags.FLAGS.mark_as_parsed()` when
worker_count > 0 and the flags are unparsed (`ensure_flags_parsed`). Worker
processes import the modules of the source and transforms: define transforms
at module level, and guard scripts with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

Transform = (grain.transforms.Map | grain.transforms.RandomMap | grain.transforms.Filter
             | Callable[[Any], Any])
STATE_VERSION = 1


def ensure_flags_parsed() -> None:
  """Marks absl flags as parsed (with their defaults) if nothing parsed them,
  as Grain needs to read its flags; a no-op under absl.app.run."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def stack(records: Sequence[Any]) -> Any:
  """Stacks same-structured records into one batch of numpy arrays (strings
  become numpy unicode arrays)."""
  return jax.tree.map(lambda *xs: np.stack(xs), *records)


def _check_transforms(transforms: Sequence[Transform]) -> tuple:
  for i, t in enumerate(transforms):
    if isinstance(t, (grain.transforms.Map, grain.transforms.RandomMap,
                      grain.transforms.Filter)):
      continue
    if isinstance(t, grain.transforms.Transformation) or not callable(t):
      raise TypeError(
          f"transform {i} ({type(t).__name__}) is not supported: train_loader "
          "batches by itself and takes grain Map / RandomMap / Filter transforms "
          "or plain callables (record -> record)")
  return tuple(transforms)


def shard_range(num_records: int, options: grain.sharding.ShardOptions) -> tuple[int, int]:
  """[start, stop) of this shard's records, as grain's even split: contiguous,
  len // count each, the remainder dropped or spread over the first shards."""
  per, rest = divmod(num_records, options.shard_count)
  i = options.shard_index
  if options.drop_remainder or rest == 0:
    return per * i, per * (i + 1)
  start = per * i + min(i, rest)
  return start, start + per + (1 if i < rest else 0)


def process_shard_options(drop_remainder: bool = True) -> grain.sharding.ShardOptions:
  """This JAX process's shard: index jax.process_index() of process_count()."""
  return grain.sharding.ShardOptions(shard_index=jax.process_index(),
                                     shard_count=jax.process_count(),
                                     drop_remainder=drop_remainder)


def process_batch(global_batch: int) -> int:
  """This process's rows of a global batch (global_batch / process_count)."""
  count = jax.process_count()
  if global_batch < 1 or global_batch % count:
    raise ValueError(f"a global batch of {global_batch} records does not split evenly "
                     f"over {count} processes")
  return global_batch // count


class _Positioned:
  """(stream position, rng position, record key): map_with_index of the
  shuffled keys; both positions are the same in shard_mode="records"."""

  def __call__(self, position: int, key: int) -> tuple[int, int, int]:
    return position, position, int(key)


class _BatchRow:
  """shard_mode="batch_rows": this process's j-th record is row
  `index * rows + j % rows` of global batch `j // rows` of the global order
  (`glob`, (position, position, key) items): (j, global position, key)."""

  def __init__(self, glob: grain.MapDataset, rows: int, count: int, index: int):
    self.glob, self.rows, self.count, self.index = glob, rows, count, index

  def global_position(self, j: int) -> int:
    return (j // self.rows) * self.rows * self.count + self.index * self.rows + j % self.rows

  def __call__(self, j: int) -> tuple[int, int, int]:
    _, position, key = self.glob[self.global_position(j)]
    return int(j), position, key


def _local_length(total: int, rows: int, count: int, index: int) -> int:
  """How many of `total` global positions fall in this process's rows."""
  block = rows * count
  full, rest = divmod(total, block)
  return full * rows + min(max(rest - index * rows, 0), rows)


class _LoadChunk:
  """Reads a chunk of (position, rng position, key), applies the transforms record by record
  (dropping what a Filter rejects or a map turns into None) and stacks what is
  left: a pre-batch
  {"positions": int64 [n], "batch": stacked records or None}."""

  def __init__(self, source, transforms: tuple, seed: int, rng_shard: int):
    self.source = source
    self.transforms = transforms
    self.seed = seed
    self.rng_shard = rng_shard

  def _read(self, keys: list[int]) -> list:
    getitems = getattr(self.source, "__getitems__", None)
    if getitems is not None:
      return list(getitems(keys))
    return [self.source[k] for k in keys]

  def __call__(self, chunk: list[tuple[int, int]]) -> dict:
    positions, kept = [], []
    for (position, rng_position, _), record in zip(chunk, self._read([k for *_, k in chunk]),
                                                   strict=True):
      for t in self.transforms:
        if isinstance(t, grain.transforms.Filter):
          record = record if t.filter(record) else None
        elif isinstance(t, grain.transforms.RandomMap):
          rng = np.random.default_rng([self.seed, self.rng_shard, rng_position])
          record = t.random_map(record, rng)
        elif isinstance(t, grain.transforms.Map):
          record = t.map(record)
        else:
          record = t(record)
        if record is None:
          break
      if record is not None:
        positions.append(position)
        kept.append(record)
    return {"positions": np.asarray(positions, np.int64),
            "batch": stack(kept) if kept else None}


class TrainIterator:
  """Batches (dicts of stacked numpy arrays, `batch_size` records each) of a
  train_loader pipeline. Its state is the stream position of the next record,
  exact between batches and independent of worker count and chunking."""

  def __init__(self, *, chunks: Callable[[int], grain.MapDataset], identity: dict,
               batch_size: int,
               drop_remainder: bool, read_options: grain.ReadOptions,
               mp_options: grain.MultiprocessingOptions):
    self._chunks = chunks          # position -> MapDataset of pre-batches from there
    self._identity = identity
    self.batch_size = batch_size
    self.drop_remainder = drop_remainder
    self._read_options = read_options
    self._mp_options = mp_options
    self._position = 0             # stream position of the next unread record
    self._iterator = None
    self._pending: list = []       # [positions, batch] pre-batches not consumed yet

  def _start(self) -> None:
    ds = self._chunks(self._position).to_iter_dataset(self._read_options)
    if self._mp_options.num_workers > 0:
      ds = ds.mp_prefetch(self._mp_options)
    self._iterator = iter(ds)
    self._pending = []

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> Any:
    if self._iterator is None:
      self._start()
    have = sum(len(p) for p, _ in self._pending)
    while have < self.batch_size:
      try:
        pre = next(self._iterator)
      except StopIteration:
        break
      if len(pre["positions"]):
        self._pending.append([pre["positions"], pre["batch"]])
        have += len(pre["positions"])
    if have == 0 or (self.drop_remainder and have < self.batch_size):
      raise StopIteration
    take = min(have, self.batch_size)
    parts, left = [], take
    while left:
      positions, batch = self._pending[0]
      n = min(left, len(positions))
      parts.append(jax.tree.map(lambda x, n=n: x[:n], batch))
      self._position = int(positions[n - 1]) + 1
      if n == len(positions):
        self._pending.pop(0)
      else:
        self._pending[0] = [positions[n:], jax.tree.map(lambda x, n=n: x[n:], batch)]
      left -= n
    if len(parts) == 1:
      return parts[0]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

  def get_state(self) -> bytes:
    return json.dumps({**self._identity, "position": self._position}).encode()

  def set_state(self, state: bytes) -> None:
    state = json.loads(state.decode() if isinstance(state, bytes) else state)
    keys = (set(self._identity) | set(state)) - {"position"}
    mismatched = {k: (state.get(k), self._identity.get(k)) for k in sorted(keys)
                  if state.get(k) != self._identity.get(k)}
    if mismatched:
      raise ValueError("the saved data iterator does not match this loader "
                       f"(field: (saved, now)): {mismatched}")
    self.close()
    self._position = int(state["position"])
    self._iterator = None

  def start_prefetch(self) -> None:
    if self._iterator is None:
      self._start()
    self._iterator.start_prefetch()

  def close(self) -> None:
    """Stops the worker processes now (garbage collection does it too, later)."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None
    self._pending = []

  def __enter__(self):  # -> Self (typing.Self needs Python 3.11)
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def train_loader(source: Sequence[Any], *, batch_size: int, seed: int,
                 transforms: Sequence[Transform] = (), num_epochs: int | None = None,
                 worker_count: int = 0, shard_by_process: bool = True,
                 shard_mode: str = "records", drop_remainder: bool = True,
                 shard_options: grain.sharding.ShardOptions | None = None,
                 worker_buffer_size: int = 2,
                 read_options: grain.ReadOptions | None = None) -> TrainIterator:
  """Shuffled (per epoch, from `seed`), sharded batches of `source` records.

  Args:
    source: random-access records (`len`, `[i]`, optionally `__getitems__`);
      picklable if worker_count > 0.
    batch_size: records per batch on this process.
    seed: shuffle seed, an int in [0, 2**32).
    transforms: applied in order to every record: grain Map / RandomMap (its
      rng is per record, from seed and position) / Filter (drops the records
      it rejects), or plain callables (maps). A map returning None drops the
      record too.
    num_epochs: passes over this process's shard; None repeats forever.
    worker_count: Grain worker processes reading and transforming chunks of
      batch_size records (0: threads of this process). Batches and
      checkpoints do not depend on it.
    shard_by_process: shard over JAX processes; False: every process reads
      everything (as one process would).
    shard_mode: "records": each process gets its own contiguous shard
      (len // process_count records per epoch, reshuffled per epoch).
      "batch_rows": all processes walk one global order and each reads its
      batch_size rows of every global batch of batch_size x process_count
      records, so the global batches do not depend on the process count
      (see the module docstring).
    drop_remainder: drop a last batch smaller than batch_size (finite epochs).
    shard_options: explicit sharding, overrides shard_by_process (tests
      simulate processes with it).
    worker_buffer_size: chunks each worker prepares ahead.
    read_options: grain.ReadOptions for the chunk-reading threads (per worker
      if worker_count > 0); default 4 threads, 8 chunks ahead.
  """
  if isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
      0 <= seed < 2**32):
    raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")
  transforms = _check_transforms(transforms)
  if shard_options is None:
    shard_options = (process_shard_options() if shard_by_process
                     else grain.sharding.NoSharding())
  if shard_mode not in ("records", "batch_rows"):
    raise ValueError(f"shard_mode must be 'records' or 'batch_rows', got {shard_mode!r}")
  if worker_count > 0:
    ensure_flags_parsed()
  seed = int(seed)
  stream, load = _stream(source, shard_options, shard_mode, seed, num_epochs, batch_size,
                         transforms)

  def chunks(position: int) -> grain.MapDataset:
    return stream[position:].batch(batch_size, batch_fn=list).map(load)

  identity = {"version": STATE_VERSION, "num_records": len(source), "seed": seed,
              "shard_index": shard_options.shard_index,
              "shard_count": shard_options.shard_count,
              "shard_drop_remainder": shard_options.drop_remainder,
              "num_epochs": num_epochs}
  if shard_mode != "records":   # (older states have no such field)
    identity.update(shard_mode=shard_mode, batch_size=batch_size)
  return TrainIterator(
      chunks=chunks, identity=identity, batch_size=batch_size,
      drop_remainder=drop_remainder,
      read_options=read_options or grain.ReadOptions(num_threads=4, prefetch_buffer_size=8),
      mp_options=grain.MultiprocessingOptions(num_workers=worker_count,
                                              per_worker_buffer_size=worker_buffer_size))


def _stream(source, shard_options, shard_mode: str, seed: int, num_epochs, batch_size: int,
            transforms):
  """(this process's positioned record keys in reading order, the chunk loader):
  its own shuffled shard ("records") or its rows of every global batch
  ("batch_rows")."""
  index, count = shard_options.shard_index, shard_options.shard_count
  if shard_mode == "records":
    start, stop = shard_range(len(source), shard_options)
    if stop <= start:
      raise ValueError(f"shard {index} of {count} of a source of {len(source)} "
                       "records is empty")
    keys = grain.MapDataset.range(start, stop).shuffle(seed=seed).repeat(num_epochs)
    return keys.map_with_index(_Positioned()), _LoadChunk(source, transforms, seed, index)
  if len(source) < 1:
    raise ValueError("the source is empty")
  glob = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(num_epochs)
          .map_with_index(_Positioned()))
  stream = grain.MapDataset.range(_local_length(len(glob), batch_size, count, index)).map(
      _BatchRow(glob, batch_size, count, index))
  return stream, _LoadChunk(source, transforms, seed, 0)


def save_args(iterator: TrainIterator | grain.DatasetIterator | grain.DataLoaderIterator,
              ) -> grain.checkpoint.CheckpointSave:
  """Orbax args saving the iterator's state (an item of ocp.args.Composite)."""
  return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: TrainIterator | grain.DatasetIterator
                 | grain.DataLoaderIterator) -> grain.checkpoint.CheckpointRestore:
  """Orbax args restoring a saved state into `iterator` (a fresh iterator made
  with the same arguments); the restore returns the iterator itself."""
  return grain.checkpoint.CheckpointRestore(iterator)


def eval_batches(source: Sequence[Any], batch_size: int,
                 transforms: Sequence[Callable[[Any], Any] | grain.transforms.Map] = (),
                 ) -> Iterator[tuple[Any, np.ndarray]]:
  """(batch, valid) pairs over all of `source` in order, unshuffled, unsharded.

  Every batch has `batch_size` rows; the last one is padded with copies of its
  first record, and `valid` (bool [batch_size]) is False on the padding rows.
  `transforms` are 1:1 maps (filters would break the record <-> row map).
  Built on grain.MapDataset (random access, in this process).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ds = grain.MapDataset.source(source)
  for i, t in enumerate(transforms):
    is_map = isinstance(t, grain.transforms.Map) or (
        callable(t) and not isinstance(t, grain.transforms.Transformation))
    if not is_map:
      raise TypeError(f"eval_batches takes 1:1 maps only; transform {i} is {t!r}")
    ds = ds.map(t)
  ds = ds.batch(batch_size, drop_remainder=False, batch_fn=stack)
  for b in range(len(ds)):
    batch = ds[b]
    n = len(jax.tree.leaves(batch)[0])
    valid = np.arange(batch_size) < n
    if n < batch_size:
      pad = batch_size - n
      batch = jax.tree.map(
          lambda x, pad=pad: np.concatenate([x, np.repeat(x[:1], pad, axis=0)]), batch)
    yield batch, valid


class MixedSource:
  """Several random-access sources mixed at fixed weights, as one source.

  The stream is cut into periods of `period` slots; in every period source k
  owns round(w_k * period) slots (largest remainder), in one pattern
  shuffled once from `seed`. The j-th slot of source k in the stream reads
  its record j mod len(source k), so each source is cycled in order (the
  train loader shuffles positions on top). Every record gets
  `record[tag] = k` (which source it came from) so one transform can treat
  the sources differently. Length: `length`, or by default the smallest
  stream in which every source with weight > 0 is read whole at least once.
  Picklable when the sources are.
  """

  def __init__(self, sources: Sequence[Sequence[Any]], weights: Sequence[float], *,
               length: int | None = None, seed: int = 0, period: int = 1000,
               tag: str = "mix_source"):
    if len(sources) != len(weights) or not sources:
      raise ValueError(f"MixedSource needs one weight per source, got {len(sources)} "
                       f"sources and {len(weights)} weights")
    w = np.asarray(weights, np.float64)
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
      raise ValueError(f"mixture weights must be finite, >= 0 and not all 0, got {list(weights)}")
    w = w / w.sum()
    empty = [i for i, (s, x) in enumerate(zip(sources, w)) if x > 0 and len(s) == 0]
    if empty:
      raise ValueError(f"sources {empty} have weight > 0 but no records")
    if period < len(sources):
      raise ValueError(f"period ({period}) must be >= the number of sources")
    counts = np.floor(w * period).astype(int)
    rest = period - counts.sum()
    counts[np.argsort(-(w * period - counts), kind="stable")[:rest]] += 1
    counts[w == 0] = 0
    if counts.sum() != period:   # all rounding went to zero-weight sources
      counts[np.argmax(w)] += period - counts.sum()
    slots = np.repeat(np.arange(len(sources)), counts)
    np.random.default_rng(seed).shuffle(slots)
    self.sources, self.weights, self.tag = list(sources), w, tag
    self._slots, self._counts, self._period = slots, counts, period
    self._rank = np.zeros(period, np.int64)
    seen = np.zeros(len(sources), np.int64)
    for i, k in enumerate(slots):
      self._rank[i], seen[k] = seen[k], seen[k] + 1
    if length is None:
      need = [int(np.ceil(len(s) / c)) for s, c in zip(sources, counts) if c > 0]
      length = max(need) * period
    if length < 1:
      raise ValueError(f"length must be >= 1, got {length}")
    self._len = int(length)

  def locate(self, index: int) -> tuple[int, int]:
    """(source, record index) of stream position `index`."""
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range for a MixedSource of {self._len}")
    p, r = divmod(int(index), self._period)
    k = int(self._slots[r])
    j = p * int(self._counts[k]) + int(self._rank[r])
    return k, j % len(self.sources[k])

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    k, j = self.locate(index)
    return {**self.sources[k][j], self.tag: k}
