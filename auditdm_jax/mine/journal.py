"""The mining journal: chunks of probes written atomically as they are mined, a
manifest of what they were mined with, and the chunked, restartable loop.

`mine_chunks` runs every auditor over the seed pool in chunks of
`chunk_seeds` seeds (K samples each), keeps the consensus-backed probes not
seen before, and writes one chunk file per (auditor, chunk); a restart mines
only the chunks that are missing. On SIGTERM it stops after the chunk in
progress (exit 143).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping

import jax
import numpy as np

from auditdm_jax import sharding
from auditdm_jax.audit import diversity as diversity_lib
from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.data import exemplars_tfds as store
from auditdm_jax.mine.probes import probe_records
from auditdm_jax.train import preemption
from auditdm_jax.utils.fileio import atomic_write_text


def check_journal(chunks_dir: str, identity: dict) -> None:
  """Keeps the chunk journal only if it was mined with the same settings and
  models; otherwise moves it aside to `chunks.previous` (one generation) and
  starts a new one."""
  path = os.path.join(chunks_dir, "manifest.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old == identity:
      return
    changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    previous = chunks_dir + ".previous"
    if os.path.exists(previous):
      shutil.rmtree(previous)
    os.replace(chunks_dir, previous)
    print(f"mine: the journal in {chunks_dir} was mined with other {changed}; moved it to "
          f"{previous} and mining again", flush=True)
  elif store.chunk_files(chunks_dir):
    raise ValueError(f"mine: {chunks_dir} holds chunks but no manifest.json; move them away "
                     "or delete them")
  os.makedirs(chunks_dir, exist_ok=True)
  atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True))


def check_journal_all(chunks_dir: str, identity: dict) -> None:
  """check_journal on process 0 while the others wait (they read the journal next)."""
  if sharding.is_primary():
    check_journal(chunks_dir, identity)
  sharding.barrier(f"auditdm mine journal {chunks_dir}")


def mine_chunks(auditors: Mapping, new_auditing: Callable, pool, chunks_dir: str, *,
                mixture, samples_per_seed: int, chunk_seeds: int, n_seeds: int, seed: int,
                targets, refs, focus: str, consensus: str, editor,
                auditor_steps: Mapping[str, int], judge_threshold: float | None = None) -> int:
  """Mines the chunks missing from `chunks_dir`; returns how many it mined.

  auditors: name -> VLM, mined in order; new_auditing(name, vlm) -> rollout.Auditing
  for the first (later ones swap their parameters into it); pool: the seed
  images (`audit.learner.SeedPool`); auditor_steps: each auditor's GRPO step
  (recorded in its probes); judge_threshold: judge mode (the rollouts carry
  the judge's p_same of every target; a probe fails a target by the judge's
  decision, `probes.probe_records`), None in exact mode."""
  k, chunk = samples_per_seed, chunk_seeds
  n_chunks = -(-n_seeds // chunk)
  auditing = None
  seen = {r["id"] for r in store.iter_chunks(chunks_dir)}
  mined = 0
  # What is left to mine, decided by every process before process 0 writes more.
  todos = {a: [c for c in range(n_chunks)
               if not os.path.exists(store.chunk_path(chunks_dir, a, c))]
           for a in auditors}
  with preemption.StopOnSignal() as stop:   # SIGTERM: stop after the chunk in progress
    for a_i, aud_name in enumerate(auditors):
      todo = todos[aud_name]
      if not todo:
        continue
      aud = auditors[aud_name]
      if auditing is None:
        auditing = new_auditing(aud_name, aud)
      else:
        auditing.auditor.set_params(aud.params)
      step = auditor_steps.get(aud_name, 0)
      for c in todo:
        rng = np.random.default_rng([seed, 31337, a_i, c])
        idx = [(c * chunk + j) % n_seeds for j in range(chunk)]   # fixed shape
        seeds = pool.get(idx)
        # With descriptors (audit.diversity) each seed's k samples are spread
        # over them: groups of k / m samples, one descriptor each.
        groups, descs, kk = diversity_lib.spread(auditing.diversity, chunk, k, c * chunk)
        idx = [idx[g] for g in groups]
        seeds = [seeds[g] for g in groups]
        pairings = rollout_lib.draw_pairings(mixture, len(groups), rng)
        roll = auditing.run(seeds, pairings, jax.random.key(seed * 7_919 + 1_000 * a_i + c),
                            num_samples=kk, descriptors=descs)
        recs = probe_records(roll, seeds, idx, kk, targets, refs, consensus, editor,
                             aud_name, step, judge_threshold=judge_threshold)
        keep = []
        for r in recs:
          if r["id"] not in seen:
            seen.add(r["id"])
            keep.append(r)
        if sharding.is_primary():   # every process mined the same probes
          store.write_chunk(store.chunk_path(chunks_dir, aud_name, c), keep)
        mined += 1
        n_fail = sum(focus in r["failed"] for r in keep)
        print(f"mine: {aud_name} chunk {c + 1}/{n_chunks}: {len(keep)} new probes, "
              f"{n_fail} failures of {focus}", flush=True)
        if stop.requested():
          raise stop.stop(f"after mining chunk {c + 1} of {n_chunks} ({aud_name}); the "
                          f"chunks so far are in {chunks_dir}")
  return mined
