"""Supervised fine-tuning (SFT) of PaliGemma 2 / Gemma 3 VLMs.

    params, summary = train(cfg, params, data_iter, TrainConfig(steps=1000), workdir)

Data: any iterator of dict batches of numpy arrays (a Grain `DatasetIterator`
or `DataLoaderIterator` for exact resumption), one batch per optimizer step:
  images      uint8 [B, S, S, 3] at the model's resolution;
  tokens      int   [B, T] text tokens (Gemma 3: the prompt's <start_of_image>
              already expanded into the image block, `sft_example` does it);
  input_mask  bool  [B, T] real (non-pad) tokens;
  mask_ar     int   [B, T] 1 on the answer (suffix) tokens, 0 on the prompt;
  loss_mask   bool  [B, T] optional; which tokens the loss covers (default
              input_mask & mask_ar: the answer tokens);
  phrases     int   [B, P, 3] with TrainConfig.phrase_aux > 0 (PaliGemma):
              (text position of a referring phrase's last token, its object's
              row, column), -1 rows unused (`tasks.phrase_labels`).
Other keys are ignored. `sft_example` / `sft_batch` build these from token ids.

The loss is the mean negative log-likelihood over all loss tokens of the batch
(token-weighted, not a mean of per-row means). With `phrase_aux` > 0 a
grounding term is added: linear heads on the final hidden state at each
phrase's last token predict its object's row and column (softmax
cross-entropy, summed over the two heads, mean over the batch's phrases,
times phrase_aux). The heads live in the training state as
params["phrase_heads"] and are not part of the returned model. A step splits the batch into
`grad_accum` microbatches inside one jitted function (`lax.scan`), sums the
per-token gradients and divides by the batch's token count, so accumulation
changes memory, not the update. Parameters and the optimizer state are
sharded over the mesh by the repo's partition rules (`auditdm_jax.sharding`),
batches over data x fsdp; the step has explicit in/out shardings and donates
the training state.

Resumption: `workdir/ckpt` (see `ckpt.py`) holds params, optimizer state, the
data iterator's position, the RNG key and the step; `train` continues from
the latest checkpoint when one exists, and a run killed at any point and
restarted ends with exactly the parameters of an uninterrupted run (on the
same devices). A non-finite loss or gradient norm raises `NonFiniteLossError`
before anything is saved; the update of that step is not applied.

The pieces live by concern: `config.TrainConfig`, `batches` (rows and their
checks), `loss`, `step` (the jitted step), `trainer.Trainer` (sharded state,
`init_state`, `step`, `abstract_state`, for callers that drive steps
themselves) and `loop` (the one training loop, shared with the auditor's
GRPO); this module wires them into `train`. Compiled steps are cached per model,
step-relevant config, mesh and batch shapes, so repeated runs compile once.
Single-process only: batches are placed with `jax.device_put` from the full
host batch (multi-host input would need make_array_from_process_local_data).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from jax.sharding import Mesh

from auditdm_jax import sharding
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.train import ckpt as ckpt_lib
from auditdm_jax.train import loop as loop_lib
from auditdm_jax.train.config import TrainConfig
from auditdm_jax.train.loop import NonFiniteLossError
from auditdm_jax.train.loss import PHRASE_HEADS
from auditdm_jax.train.trainer import Trainer
from auditdm_jax.utils.fileio import atomic_write_text

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "train"]


def _sft_step(trainer: Trainer, data_iter, tcfg: TrainConfig):
  """The loop's step: the next batch, one optimizer update, the row."""

  def step_fn(state, step):
    t0 = time.perf_counter()
    try:
      raw = next(data_iter)
    except StopIteration:
      raise ValueError(f"the data iterator ran out after {step} steps (TrainConfig.steps="
                       f"{tcfg.steps}); repeat the dataset (e.g. MapDataset.repeat())"
                       ) from None
    compile_before = trainer.compile_s
    state, m = trainer.step(state, raw)
    dt = time.perf_counter() - t0 - (trainer.compile_s - compile_before)
    if not m["finite"]:
      return loop_lib.StepOut(state, m, {})
    row = {"loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
           **({"phrase_loss": float(m["phrase_loss"])} if "phrase_loss" in m else {}),
           "lr": float(trainer.schedule(step)), "grad_norm": float(m["grad_norm"]),
           "answer_tokens": int(m["answer_tokens"]),
           "tokens_per_s": float(m["text_tokens"]) / max(dt, 1e-9), "step_time": dt}
    return loop_lib.StepOut(state, m, row)

  return step_fn


def train(cfg: VLMConfig, params, data_iter, tcfg: TrainConfig, workdir: str, *,
          mesh: Mesh | None = None,
          eval_fn: Callable[[Any, int], Mapping[str, float]] | None = None,
          tokenizer=None) -> tuple[Any, dict[str, Any]]:
  """Fine-tunes `params` for tcfg.steps steps; returns (params, summary).

  Resumes from the latest checkpoint in workdir/ckpt when there is one (then
  `params` is ignored and may be None). `mesh` overrides tcfg.mesh (e.g. a
  mesh over a subset of the devices). `eval_fn(params, step) -> {name: value}`
  runs every tcfg.eval_every steps and at the end; its values are logged as
  "eval/<name>". With tcfg.export_final the final model (and `tokenizer`, if
  given) is saved to workdir/final in the repo's native format. Metrics go to
  stdout, workdir/metrics.jsonl and workdir/tb; the summary also to
  workdir/summary.json.
  """
  t_begin = time.perf_counter()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(cfg, tcfg, mesh)
  checkpointer = ckpt_lib.TrainCheckpointer(os.path.join(workdir, "ckpt"),
                                            tcfg.keep_checkpoints, data_iter)
  try:
    if checkpointer.mode == ckpt_lib.DATA_NONE:
      warnings.warn(f"the data iterator ({type(data_iter).__name__}) has no get_state/"
                    "set_state: its position is not checkpointed, and a resumed run "
                    "restarts it from the beginning; use a Grain iterator", stacklevel=2)

    def init():
      if params is None:
        raise ValueError(f"no checkpoint in {checkpointer.directory} to resume from and "
                         "no params given")
      return trainer.init_state(params)

    state, latest = loop_lib.resume(checkpointer, trainer, init)
    start = int(state["step"])
    if start > tcfg.steps:
      warnings.warn(f"the checkpoint in {checkpointer.directory} is at step {start}, past "
                    f"TrainConfig.steps={tcfg.steps}", stacklevel=2)
    meta = {"opt_paths": trainer.opt_paths, "data_mode": checkpointer.mode,
            "variant": cfg.variant, "family": cfg.family, "train_config": repr(tcfg)}

    def eval_rows(state, step):
      if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == tcfg.steps:
        return {f"eval/{k}": v for k, v in dict(eval_fn(state["params"], step)).items()}
      return {}
    lcfg = loop_lib.LoopConfig(steps=tcfg.steps, checkpoint_every=tcfg.checkpoint_every,
                               log_every=tcfg.log_every, name="",
                               progress=tcfg.progress, tensorboard=tcfg.tensorboard)
    state, step, last, _ = loop_lib.run(
        state, start, lcfg, _sft_step(trainer, data_iter, tcfg), checkpointer, workdir, meta,
        last_saved=latest, extra_row=None if eval_fn is None else eval_rows,
        postfix=lambda row: {"loss": f"{row['loss']:.4f}"})
    saved = sorted(checkpointer.all_steps())
  finally:
    checkpointer.close()

  params = state["params"]
  if PHRASE_HEADS in params:            # training-only heads: not part of the model
    params = {k: v for k, v in params.items() if k != PHRASE_HEADS}
  if tcfg.export_final:
    from auditdm_jax.models.handle import VLM  # pylint: disable=import-outside-toplevel
    VLM(cfg, params, tokenizer).save(os.path.join(workdir, "final"))
  summary = {"start_step": start, "steps": step, "resumed": latest is not None,
             "final": last, "compile_s": trainer.compile_s,
             "wall_s": time.perf_counter() - t_begin, "checkpoints": saved}
  if sharding.is_primary():
    atomic_write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  return params, summary
