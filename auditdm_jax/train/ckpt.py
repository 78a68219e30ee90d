"""Training checkpoints: one Orbax `CheckpointManager` under `workdir/ckpt`.

Each step directory holds three items:
  state  params, optimizer state (its leaves as a flat {"00000": leaf} dict, so
         optax's empty / masked nodes never reach Orbax), the raw RNG key
         data (uint32) and the step;
  data   the data iterator's position: Grain's own Orbax handler
         (`grain.checkpoint.CheckpointSave/CheckpointRestore`, one JSON file
         per process) for Grain iterators, else the JSON of `get_state()`;
  meta   JSON: step, the optimizer-state leaf paths (checked on restore, so a
         changed `frozen` set fails clearly), the TrainConfig and model variant.

Saving is synchronous (async checkpointing off): Orbax writes into a
temporary directory and renames it into place when `save` returns, so a
process killed at any moment leaves the previous checkpoints complete and at
most an unfinished temporary directory, which Orbax ignores (and removes
when the next run opens the manager). A save that fails (a full disk, a
read-only directory) removes its temporary directory and raises an error
naming the directory, the step and the previous checkpoint, which is intact.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from auditdm_jax.utils import chaos, fileio

DATA_GRAIN, DATA_JSON, DATA_NONE = "grain", "json", "none"


def data_mode(data_iter) -> str:
  """How a data iterator's position is checkpointed."""
  if isinstance(data_iter, (grain.DatasetIterator, grain.DataLoaderIterator)):
    return DATA_GRAIN
  if callable(getattr(data_iter, "get_state", None)) and callable(
      getattr(data_iter, "set_state", None)):
    return DATA_JSON
  return DATA_NONE


def flatten_opt_state(opt_state) -> tuple[dict[str, Any], list[str]]:
  """({"00000": leaf, ...}, [key path of each leaf])."""
  leaves = jax.tree_util.tree_leaves_with_path(opt_state)
  return ({f"{i:05d}": leaf for i, (_, leaf) in enumerate(leaves)},
          [jax.tree_util.keystr(p) for p, _ in leaves])


def unflatten_opt_state(template, flat: dict[str, Any]):
  treedef = jax.tree.structure(template)
  return jax.tree.unflatten(treedef, [flat[f"{i:05d}"] for i in range(treedef.num_leaves)])


class TrainCheckpointer:
  """Saves / restores (state, data position, meta) by step under `directory`."""

  def __init__(self, directory: str, keep: int | None, data_iter):
    self.directory = os.path.abspath(directory)
    self.mode = data_mode(data_iter)
    self.data_iter = data_iter
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def _data_save(self):
    if self.mode == DATA_GRAIN:
      return grain.checkpoint.CheckpointSave(self.data_iter)
    state = self.data_iter.get_state()
    is_bytes = isinstance(state, bytes)
    if is_bytes:
      state = state.decode()
    try:
      json.dumps(state)
    except TypeError as e:
      raise TypeError(f"the data iterator's get_state() is not JSON-serialisable: {e}; "
                      "use a Grain iterator") from e
    return ocp.args.JsonSave({"state": state, "bytes": is_bytes})

  def save(self, step: int, state: dict, meta: dict) -> None:
    flat_opt, _ = flatten_opt_state(state["opt_state"])
    tree = dict(state, opt_state=flat_opt)
    items = {"state": ocp.args.StandardSave(tree), "meta": ocp.args.JsonSave(meta)}
    if self.mode != DATA_NONE:
      items["data"] = self._data_save()
    chaos.point("train_ckpt_save")
    previous = self.manager.latest_step()
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
      self.manager.wait_until_finished()
    except Exception as e:   # a full disk, a read-only directory, ... (Orbax's own types too)
      raise self._save_failed(step, previous, e) from e
    chaos.point("train_ckpt_saved")

  def _save_failed(self, step: int, previous: int | None, e: Exception) -> Exception:
    """The error of a failed save: the step's unfinished temporary directory
    is removed (the finished steps are never touched: Orbax renames a step
    into place only once it is complete), and the message names the directory,
    the step and the checkpoint a restart resumes from."""
    if jax.process_index() == 0:
      self._remove_unfinished(step)
    kept = (f"the previous checkpoint (step {previous}) in {self.directory} is intact and "
            "a restart resumes from it" if previous is not None
            else f"no earlier checkpoint was in {self.directory}")
    what = f"saving the training checkpoint of step {step} in {self.directory} failed"
    return fileio.write_failed(e, what, kept)

  def _remove_unfinished(self, step: int, patience_s: float = 5.0) -> None:
    """Removes `<step>.orbax-checkpoint-tmp*`. When one item of a save fails,
    Orbax raises at once while the other items' writes may still be running
    (and recreating their directories), so this removes until nothing has
    come back for a moment (at most `patience_s`)."""
    pattern = os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")
    deadline = time.monotonic() + patience_s
    while True:
      for tmp in glob.glob(pattern):
        shutil.rmtree(tmp, ignore_errors=True)
      time.sleep(0.1)
      if not glob.glob(pattern) or time.monotonic() > deadline:
        return

  def meta(self, step: int) -> dict:
    """The JSON meta saved with `step` (no arrays are read)."""
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore(self, step: int, abstract_state: dict, opt_paths: list[str]
              ) -> tuple[dict, dict]:
    """(state placed as abstract_state's shardings say, meta); the data
    iterator is moved to the saved position in place."""
    where = os.path.join(self.directory, str(step))
    meta = self.meta(step)
    if meta.get("opt_paths") != opt_paths:
      raise ValueError(
          f"checkpoint {where} holds a different optimizer state "
          f"({len(meta.get('opt_paths') or [])} leaves, this run has {len(opt_paths)}): "
          "were TrainConfig.frozen / no_decay / grad_clip or the model changed? "
          "Use a fresh workdir for a different configuration.")
    saved_mode = meta.get("data_mode", DATA_NONE)
    if saved_mode != self.mode:
      raise ValueError(f"checkpoint {where} saved the data position as {saved_mode!r} "
                       f"but this run's iterator is {self.mode!r}")
    flat_opt, _ = flatten_opt_state(abstract_state["opt_state"])
    abstract = dict(abstract_state, opt_state=flat_opt)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if self.mode == DATA_GRAIN:
      items["data"] = grain.checkpoint.CheckpointRestore(self.data_iter)
    elif self.mode == DATA_JSON:
      items["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    if self.mode == DATA_JSON:
      state = out["data"]["state"]
      self.data_iter.set_state(state.encode() if out["data"]["bytes"] else state)
    restored = dict(out["state"])
    restored["opt_state"] = unflatten_opt_state(abstract_state["opt_state"],
                                                restored["opt_state"])
    return restored, meta

  def close(self) -> None:
    self.manager.close()
