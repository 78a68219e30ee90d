"""`mine` stage: the trained auditor's probes -> an exemplar store and failure types.

One pass of each auditor checkpoint in `mine.auditors` (default: the trained
auditor) over the seed images: `samples_per_seed` samples per seed, pairings
drawn from the mixture, every target and reference answering. A probe is
kept when it is well formed and the references reach a consensus; it is a
failure *exemplar* of every target whose answer differs from that consensus
(`exemplars` split), otherwise a pseudo-labelled example (`pseudo_labelled`
split, used by the bootstrap rectification). Duplicates (same normalised
question on the same image) are dropped.

Work is journaled in chunks of `chunk_seeds` seeds (`data.exemplars_tfds`):
each chunk is written atomically, a restart skips the chunks on disk, and the
store is then published as a TFDS array_record dataset in
`<workdir>/mine/tfds`. Failure types (`mine.failure_types`) are ranked for the
audited target and written with the ground-truth measurements to
`<workdir>/mine.json`:

  {"failure_types": [{"name", "count", "share": {TARGET: f}, "rate", ...}],
   "planted_gap_recall", "planted_gaps": {TARGET: {SPEC: {...}}},
   "exemplar_precision", "label_precision", "probes", "exemplars", "wall_s", ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from auditdm_jax import models, sharding
from auditdm_jax.audit import editor as editor_lib
from auditdm_jax.audit import reward as reward_lib
from auditdm_jax.audit import rollout as rollout_lib
from auditdm_jax.data import exemplars_tfds as store
from auditdm_jax.eval.benchmark import dumps
from auditdm_jax.mine import failure_types as ft
from auditdm_jax.sampling import Sampler
from auditdm_jax.scenes import gaps as gaps_lib
from auditdm_jax.scenes import parse
from auditdm_jax.scenes.world import Scene
from auditdm_jax.stages.audit import SeedPool, audit_target, configs_from, roles, seed_source
from auditdm_jax.stages.init_models import model_dir
from auditdm_jax.train import preemption
from auditdm_jax.utils.fileio import atomic_write_text

DEFAULTS = dict(auditors=(), seeds=0, samples_per_seed=8, chunk_seeds=32, mixture={},
                temperature=1.0, top_k=5, purity=0.5, merge_rate=0.5, min_probes=3,
                gallery=24)


def settings(config) -> dict:
  m = dict(DEFAULTS)
  m.update(dict(config.get("mine", {})))
  if not m["auditors"]:
    aud = roles(config, "auditor")
    m["auditors"] = tuple(f"{a}_trained" for a in aud)
  if not m["mixture"]:
    m["mixture"] = dict(config.audit.mixture)
  return m


def store_paths(workdir: str) -> tuple[str, str]:
  root = os.path.join(workdir, "mine")
  return os.path.join(root, "chunks"), os.path.join(root, "tfds")


def published_path(workdir: str) -> str:
  return os.path.join(store_paths(workdir)[1], store.NAME, store.VERSION)


def dedup_key(question: str, image: np.ndarray) -> str:
  h = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
  return hashlib.sha1(f"{reward_lib.normalise(question)}|{h}".encode()).hexdigest()[:16]


def probe_records(roll: rollout_lib.Rollout, seeds, seed_index, k: int, targets, refs,
                  rule: str, editor, auditor: str, step: int) -> list[dict]:
  """The consensus-backed, well-formed rows of a rollout as store records.
  Answers are compared as parsed (`Rollout.parsed`); a target whose answer
  does not parse has not answered and is not a failure of this probe."""
  ref_answers = [roll.parsed[r] for r in refs]
  cons, has = rollout_lib.consensus_text(ref_answers, rule)
  skill_of = getattr(editor, "question_skill", None)
  out = []
  for i in range(roll.n):
    if not (roll.valid[i] and has[i]):
      continue
    pseudo = next(roll.answers[r][i] for r in refs if roll.parsed[r][i] == cons[i])
    failed = [t for t in targets if roll.parsed[t][i] and roll.parsed[t][i] != cons[i]]
    skill = skill_of(roll.context[i], roll.question[i]) if skill_of else ""
    texts = roll.texts[i]
    s = i // k
    out.append({
        "id": dedup_key(roll.question[i], roll.image[i]),
        "pairing": roll.pairings[i], "route": rollout_lib.PAIRINGS[roll.pairings[i]][0],
        "auditor_text": texts[0], "auditor_text2": texts[1] if len(texts) > 1 else "",
        "question": roll.question[i], "pseudo_label": pseudo,
        "answers": {m: roll.answers[m][i] for m in list(targets) + list(refs)},
        "failed": failed, "skill": skill, "factor": roll.factor[i],
        "category": ft.category(skill, cons[i], roll.factor[i]),
        "context": roll.context[i] if isinstance(roll.context[i], str) else "",
        "auditor": auditor, "auditor_step": int(step), "seed_index": int(seed_index[s]),
        "seed_image": seeds[s].image, "image": roll.image[i]})
  return out


def params_fingerprint(params) -> str:
  """A digest of parameter values (per-leaf sum and sum of squares, reduced
  where the arrays live): equal for a re-saved copy of the same weights,
  different after any training step."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  stats = [jax.device_get((jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))))
           for _, x in leaves]
  names = "|".join(jax.tree_util.keystr(p) for p, _ in leaves)
  return hashlib.sha1(names.encode() + np.asarray(stats, np.float64).tobytes()).hexdigest()[:16]


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


def _auditor_step(workdir: str, name: str) -> int:
  path = os.path.join(workdir, "audit.json")
  if name.endswith("_trained") and os.path.exists(path):
    with open(path) as f:
      return int(json.load(f).get("steps", 0))
  return 0


def scene_truth(records_by_id: dict[str, dict]):
  """id -> (skill, facets, answer) by the scene world, or None (no scene)."""
  def truth(i: str):
    r = records_by_id[i]
    if not r["context"]:
      return None
    q, _ = parse.try_answer(Scene.from_json(r["context"]), r["question"])
    return None if q is None else (q.skill, q.facets, q.answer)
  return truth


def analyse(config, records: list[dict], targets: list[str], focus: str, m: dict) -> dict:
  """Failure types and, in the scene world, their truth measurements."""
  probes = [ft.Probe(r["id"], r["skill"], reward_lib.normalise(r["pseudo_label"]),
                     r["factor"], tuple(r["failed"]),
                     tuple(sorted(parse.subject_attributes(r["question"]).items())))
            for r in records]
  types = ft.group(probes, targets, focus, float(m["merge_rate"]), int(m["min_probes"]))
  types = [t for t in types if sum(t.failures.values())]   # no target fails: not a failure type
  by_id = {r["id"]: r for r in records}
  truth = scene_truth(by_id)
  planted, found, total = {}, 0, 0
  for t in targets:
    gaps = [str(g) for g in gaps_lib.parse_gaps(list(config.models[t].get("gaps", ())))]
    res = ft.gap_recall(types, t, gaps, truth, int(m["top_k"]), float(m["purity"]))
    planted[t] = res
    found += sum(v["found"] for v in res.values())
    total += len(res)
  exemplars = [r for r in records if r["failed"]]
  prec = {t: ft.exemplar_precision(exemplars, t, truth) for t in targets}
  focus_gaps = planted[focus]
  return {
      "failure_types": [t.to_json(focus) for t in types],
      "planted_gaps": planted,
      "planted_gap_recall": (sum(v["found"] for v in focus_gaps.values()) / len(focus_gaps)
                             if focus_gaps else float("nan")),
      "planted_gap_recall_all_targets": found / total if total else float("nan"),
      "exemplar_precision": prec[focus]["precision"],
      "label_precision": prec[focus]["label_precision"],
      "precision": prec}


def run(config, workdir: str) -> dict:
  t0 = time.time()
  if "audit" not in config:
    print("mine: this config has no `audit` section; nothing to mine", flush=True)
    return {}
  m = settings(config)
  focus = audit_target(config)
  targets, refs = roles(config, "target"), roles(config, "reference")
  _, _, rcfg = configs_from(config)
  mixture = rollout_lib.check_mixture(dict(m["mixture"]))
  k = int(m["samples_per_seed"])
  chunk = int(m["chunk_seeds"])
  if k < 1 or chunk < 1:
    raise ValueError(f"mine.samples_per_seed ({k}) and mine.chunk_seeds ({chunk}) must be >= 1")

  for name in list(m["auditors"]) + targets + refs:
    if not os.path.exists(model_dir(workdir, name)):
      raise FileNotFoundError(f"mine: model {name!r} has no checkpoint at "
                              f"{model_dir(workdir, name)}; run the earlier stages first")
  auditor_models = {a: models.load(model_dir(workdir, a)) for a in m["auditors"]}
  size = next(iter(auditor_models.values())).config.vision.image_size
  src = seed_source(config, workdir, size)
  n_seeds = int(m["seeds"]) or len(src)
  pool = SeedPool(src, 0, n_seeds)
  n_seeds = len(pool)
  chunks_dir, tfds_dir = store_paths(workdir)

  mesh = sharding.make_mesh(dict(config.audit.get("mesh", {"data": 1, "fsdp": -1,
                                                             "model": 1})))
  loaded = {n: models.load(model_dir(workdir, n)) for n in targets + refs}
  bucket = int(config.audit.get("answer_bucket", 32))   # one compile per answerer
  answerers = {n: Sampler(loaded[n], mesh, length_bucket=bucket) for n in targets + refs}
  editor = editor_lib.get_editor(config.audit.editor)
  auditing = None
  seed = int(config.seed)
  n_chunks = -(-n_seeds // chunk)
  check_journal_all(chunks_dir, {
      "seed": seed, "seeds": n_seeds, "samples_per_seed": k, "chunk_seeds": chunk,
      "mixture": mixture, "temperature": float(m["temperature"]),
      "max_new_tokens": int(config.audit.max_new_tokens), "consensus": rcfg.consensus,
      "targets": targets, "references": refs, "auditors": list(m["auditors"]),
      "params": {n: params_fingerprint(v.params)
                 for n, v in {**loaded, **auditor_models}.items()}})
  seen = {r["id"] for r in store.iter_chunks(chunks_dir)}
  mined = 0
  # What is left to mine, decided by every process before process 0 writes more.
  todos = {a: [c for c in range(n_chunks)
               if not os.path.exists(store.chunk_path(chunks_dir, a, c))]
           for a in m["auditors"]}
  with preemption.StopOnSignal() as stop:   # SIGTERM: stop after the chunk in progress
    for a_i, aud_name in enumerate(m["auditors"]):
      todo = todos[aud_name]
      if not todo:
        continue
      aud = auditor_models[aud_name]
      if auditing is None:
        auditing = rollout_lib.Auditing(
            Sampler(aud, mesh), answerers, focus, refs, editor, rcfg, num_samples=k,
            temperature=float(m["temperature"]),
            max_new_tokens=int(config.audit.max_new_tokens),
            answer_tokens=int(config.audit.get("answer_tokens", 4)))
      else:
        auditing.auditor.params = jax.device_put(aud.params, auditing.auditor.param_shardings)
      step = _auditor_step(workdir, aud_name)
      for c in todo:
        rng = np.random.default_rng([seed, 31337, a_i, c])
        idx = [(c * chunk + j) % n_seeds for j in range(chunk)]   # fixed shape
        seeds = pool.get(idx)
        pairings = rollout_lib.draw_pairings(mixture, chunk, rng)
        roll = auditing.run(seeds, pairings, jax.random.key(seed * 7_919 + 1_000 * a_i + c),
                            num_samples=k)
        recs = probe_records(roll, seeds, idx, k, targets, refs, rcfg.consensus, editor,
                             aud_name, step)
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
  t_pub = time.time()
  sharding.barrier(f"auditdm mine chunks {chunks_dir}")
  if sharding.is_primary():
    path = store.publish(chunks_dir, tfds_dir)
  else:
    path = published_path(workdir)
  sharding.barrier(f"auditdm mine store {tfds_dir}")
  records = list(store.iter_chunks(chunks_dir))
  res = analyse(config, records, targets, focus, m)
  n_ex = sum(bool(r["failed"]) for r in records)
  out = {"target": focus, "targets": targets, "references": refs,
         "auditors": list(m["auditors"]), "seeds": n_seeds, "samples_per_seed": k,
         "probes": len(records), "exemplars": n_ex,
         "exemplars_of": {t: sum(t in r["failed"] for r in records) for t in targets},
         "store": path, "chunks_mined_now": mined, **res,
         "publish_s": time.time() - t_pub, "wall_s": time.time() - t0}
  if sharding.is_primary():
    atomic_write_text(os.path.join(workdir, "mine.json"), dumps(out))
  top = "; ".join(f"{t['name']} ({t['count']})" for t in out["failure_types"][:5])
  print(f"mine: {len(records)} consensus-backed probes, {n_ex} exemplars "
        f"({out['exemplars_of'][focus]} of {focus}); top failure types of {focus}: {top}; "
        f"planted-gap recall {out['planted_gap_recall']:.2f}, exemplar precision "
        f"{out['exemplar_precision']:.2f}; {out['wall_s']:.0f}s", flush=True)
  return out
