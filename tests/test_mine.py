"""Mining, failure types, the rectification data mix and the report stage, on
hand-built inputs (no models): the exemplar store's journal and TFDS
publication, grouping and ranking of failure types, ground-truth recall and
precision, MixedSource proportions, RectifyTask rows, report.json."""

import json
import os

import ml_collections
import numpy as np
import pytest
from absl import flags

from auditdm_jax.data import exemplars_tfds as store
from auditdm_jax.data import loaders
from auditdm_jax.mine import failure_types as ft
from auditdm_jax.scenes import examples, questions
from auditdm_jax.scenes import gaps as G
from auditdm_jax.scenes import mining as scene_mining
from auditdm_jax.scenes.world import Obj, Scene, render
from auditdm_jax.mine import analysis, journal, probes
from auditdm_jax.pipeline import layout
from auditdm_jax.stages import report as report_stage
from auditdm_jax.stages.rectify import Subset, anchor_sources, checks, gap_shares, skill_weights

flags.FLAGS.mark_as_parsed()


def _record(i: int, failed=("t_small",), question="what colour is the circle?", label="red",
            skill="colour", context=""):
  img = np.full((48, 48, 3), i % 256, np.uint8)
  return {"id": f"id{i:04d}", "pairing": "edit", "route": "edit",
          "auditor_text": f"add a red circle at the top left <{i}>", "auditor_text2": "",
          "question": question, "pseudo_label": label,
          "answers": {"ref_a": label, "ref_b": label, "t_small": "blue", "t_large": label},
          "failed": list(failed), "skill": skill, "factor": "added", "category": f"{skill}: {label}",
          "context": context, "auditor": "auditor_trained", "auditor_step": 7,
          "seed_index": i, "seed_image": img, "image": 255 - img}


# -- the store ---------------------------------------------------------------------

def test_chunks_round_trip_and_publish(tmp_path):
  chunks = str(tmp_path / "chunks")
  recs = [_record(0), _record(1, failed=()), _record(2, failed=("t_small", "t_large"))]
  store.write_chunk(store.chunk_path(chunks, "auditor_trained", 0), recs[:2])
  store.write_chunk(store.chunk_path(chunks, "auditor_trained", 1), recs[2:])
  store.write_chunk(store.chunk_path(chunks, "auditor_trained", 2), [])   # a done, empty chunk
  back = list(store.iter_chunks(chunks))
  assert [r["id"] for r in back] == ["id0000", "id0001", "id0002"]
  np.testing.assert_array_equal(back[1]["image"], recs[1]["image"])
  assert not [p for p in os.listdir(chunks) if p.endswith(".tmp")]

  path = store.publish(chunks, str(tmp_path / "tfds"))
  ex = store.data_source(path, "exemplars")
  pl = store.data_source(path, "pseudo_labelled")
  assert len(ex) == 2 and len(pl) == 1
  r = ex[1]
  assert r["id"] == "id0002" and r["failed"] == ["t_small", "t_large"]
  assert r["answers"]["t_small"] == "blue" and r["auditor_step"] == 7
  np.testing.assert_array_equal(r["seed_image"], recs[2]["seed_image"])
  np.testing.assert_array_equal(r["image"], recs[2]["image"])
  # Republishing (more chunks) replaces the dataset; no build directory is left over.
  store.write_chunk(store.chunk_path(chunks, "auditor_trained", 3), [_record(3)])
  path = store.publish(chunks, str(tmp_path / "tfds"))
  assert len(store.data_source(path, "exemplars")) == 3
  assert sorted(os.listdir(tmp_path)) == ["chunks", "tfds"]


def test_store_rejects_bad_records_and_names_corrupt_chunks(tmp_path):
  bad = _record(0)
  bad["image"] = np.zeros((10, 10), np.uint8)                    # no colour axis
  with pytest.raises(ValueError, match=r"record 0: image must be a uint8 \[H, W, 3\] image"):
    store.write_chunk(str(tmp_path / "c.jsonl"), [bad])
  bad["image"] = np.zeros((10, 10, 3), np.float32)
  with pytest.raises(ValueError, match=r"got float32 \[10, 10, 3\]"):
    store.write_chunk(str(tmp_path / "c.jsonl"), [bad])
  assert not os.path.exists(tmp_path / "c.jsonl")
  missing = {k: v for k, v in _record(0).items() if k != "question"}
  with pytest.raises(ValueError, match="missing fields"):
    store.write_chunk(str(tmp_path / "c.jsonl"), [missing])
  store.write_chunk(str(tmp_path / "c.jsonl"), [_record(0)])
  with open(tmp_path / "c.jsonl", "a") as f:
    f.write('{"id": "half a line\n')
  with pytest.raises(ValueError, match=r"corrupt exemplar chunk .*c.jsonl, line 2"):
    store.read_chunk(str(tmp_path / "c.jsonl"))
  with pytest.raises(FileNotFoundError, match="run the mine stage"):
    store.data_source(str(tmp_path / "nothing"), "exemplars")


def test_dedup_key_is_question_normalised_and_image_exact():
  img = np.zeros((48, 48, 3), np.uint8)
  k = probes.dedup_key("What colour is the circle?", img)
  assert k == probes.dedup_key("what colour is  the circle", img)
  other = img.copy()
  other[0, 0, 0] = 1
  assert k != probes.dedup_key("what colour is the circle?", other)
  assert k != probes.dedup_key("what shape is the circle?", img)


# -- failure types -------------------------------------------------------------------

def _probe(i, skill, label, failed, factor=""):
  return ft.Probe(f"p{i}", skill, label, factor, tuple(failed))


def test_grouping_ranks_merges_counts_and_normalises_shares():
  probes = []
  i = 0
  def add(n, skill, label, failed):
    nonlocal i
    for _ in range(n):
      probes.append(_probe(i, skill, label, failed))
      i += 1
  add(4, "counting", "4", ["s"])            # hot: rate 1.0
  add(3, "counting", "5", ["s", "l"])       # hot and adjacent: merges with 4
  add(1, "counting", "5", [])               # 5: rate 3/4
  add(4, "counting", "2", [])               # cold: its own type
  add(2, "colour", "purple", ["s"])
  add(3, "spatial", "left", ["l"])
  types = ft.group(probes, ["s", "l"], "s")
  names = [t.name for t in types]
  assert names[0] == "counting: 4-5" and types[0].count("s") == 7 and types[0].probes == 8
  assert types[0].rate == {"s": 7 / 8, "l": 3 / 8}
  assert types[0].share["s"] == pytest.approx(0.7) and sum(types[0].share.values()) == 1
  assert names[1] == "colour: purple"
  assert "counting: 2" in names and "spatial: left" in names
  spatial = types[names.index("spatial: left")]
  assert spatial.share == {"s": 0.0, "l": 1.0} and spatial.ids == []
  # The merged type lists the focus target's exemplars, in order.
  assert types[0].ids == [f"p{j}" for j in range(7)]
  with pytest.raises(ValueError, match="focus target 'x'"):
    ft.group(probes, ["s", "l"], "x")


def test_ranking_is_by_reliable_failure_rate_beyond_the_base_rate():
  """A big type failed at the target's usual rate (here "counting: 0", a
  habit) holds more failures than a small type failed every time, but less
  excess and a lower score: the small one ranks first."""
  probes, i = [], 0
  def add(n, skill, label, fails):
    nonlocal i
    for j in range(n):
      probes.append(_probe(i, skill, label, ["s"] if j < fails else []))
      i += 1
  add(40, "counting", "0", 12)
  add(6, "colour", "purple", 6)
  add(100, "shape", "circle", 10)
  types = ft.group(probes, ["s"], "s")
  base = 28 / 146
  by = {t.name: t for t in types}
  assert by["counting: 0"].count("s") > by["colour: purple"].count("s")
  assert by["colour: purple"].excess["s"] == pytest.approx(6 - 6 * base)
  assert by["counting: 0"].excess["s"] == pytest.approx(12 - 40 * base)
  assert [t.name for t in types][:2] == ["colour: purple", "counting: 0"]
  assert by["shape: circle"].excess["s"] < 0
  assert by["colour: purple"].score["s"] == pytest.approx(ft.wilson_lower(6, 6) - base)
  # The Wilson bound: 3 of 3 is less sure than 30 of 30, and 0 of n is 0.
  assert ft.wilson_lower(3, 3) < ft.wilson_lower(30, 30) < 1.0
  assert ft.wilson_lower(0, 10) == pytest.approx(0.0, abs=1e-12)
  assert ft.wilson_lower(5, 10) == pytest.approx(0.2366, abs=1e-3)
  truth = {p.id: (p.skill, {"answer": p.label}, p.label) for p in probes}.get
  res = ft.gap_recall(types, "s", G.parse_gaps(["colour:purple"]), truth, top_k=1)
  assert res["colour:purple"]["found"] and res["colour:purple"]["rank"] == 1


def test_gap_recall_and_precision_against_the_truth():
  # Truth: p0-p3 are purple-colour questions (the gap), p4-p5 red ones.
  facets = {f"p{i}": ("colour", {"answer": "purple"}, "purple") for i in range(4)}
  facets.update({f"p{i}": ("colour", {"answer": "red"}, "red") for i in (4, 5)})
  truth = facets.get
  probes = [_probe(i, "colour", "purple", ["s"]) for i in range(4)]
  probes += [_probe(i, "colour", "red", ["s"]) for i in (4, 5)]
  types = ft.group(probes, ["s"], "s")
  res = ft.gap_recall(types, "s", G.parse_gaps(["colour:purple", "counting:n>=4"]), truth, top_k=5)
  assert res["colour:purple"]["found"] and res["colour:purple"]["rank"] == 1
  assert res["colour:purple"]["type"] == "colour: purple"
  assert not res["counting:n>=4"]["found"]
  # top_k=1 with the red type ranked first would miss purple: rank by failures.
  probes += [_probe(i, "colour", "red", ["s"]) for i in range(6, 12)]
  facets.update({f"p{i}": ("colour", {"answer": "red"}, "red") for i in range(6, 12)})
  types = ft.group(probes, ["s"], "s")
  purple = G.parse_gaps(["colour:purple"])
  assert not ft.gap_recall(types, "s", purple, truth, top_k=1)["colour:purple"]["found"]
  assert ft.gap_recall(types, "s", purple, truth, top_k=2)["colour:purple"]["found"]

  ex = [{"id": "p0", "failed": ["s"], "answers": {"s": "blue"}, "pseudo_label": "purple"},
        {"id": "p4", "failed": ["s"], "answers": {"s": "red"}, "pseudo_label": "green"},
        {"id": "p5", "failed": [], "answers": {"s": "red"}, "pseudo_label": "red"}]
  p = ft.exemplar_precision(ex, "s", truth)
  assert p == {"precision": 0.5, "label_precision": 0.5, "exemplars_with_truth": 2}


def test_scene_truth_reads_the_world():
  scene = Scene((Obj(0, 0, "circle", "purple", "large"), Obj(2, 2, "square", "red", "small")))
  rec = {"context": scene.to_json(), "question": "what colour is the circle?"}
  skill, fac, answer = scene_mining.scene_truth({"a": rec})("a")
  assert (skill, answer) == ("colour", "purple") and dict(fac)["answer"] == "purple"
  assert scene_mining.scene_truth({"a": dict(rec, context="")})("a") is None


def test_reference_errors_measure_the_joint_and_independent_rates():
  """Per skill: each reference's error, the consensus's (both wrong with the
  same answer) and the product of the two (independent errors)."""
  truth = {f"c{i}": ("colour", {}, "red") for i in range(4)}
  truth.update({f"n{i}": ("counting", {}, "two") for i in range(5)})
  recs = [  # colour: ref_a wrong twice, ref_b once, both together once
      {"id": "c0", "pseudo_label": "blue", "answers": {"ref_a": "blue", "ref_b": "blue"}},
      {"id": "c1", "pseudo_label": "red", "answers": {"ref_a": "green", "ref_b": "red"}},
      {"id": "c2", "pseudo_label": "red", "answers": {"ref_a": "red", "ref_b": "red"}},
      {"id": "c3", "pseudo_label": "red", "answers": {"ref_a": "red", "ref_b": "red"}},
      # counting: "2" is "two" once normalised; one joint error
      {"id": "n0", "pseudo_label": "2", "answers": {"ref_a": "2", "ref_b": "two"}},
      {"id": "n1", "pseudo_label": "three", "answers": {"ref_a": "three", "ref_b": "three"}},
      {"id": "n2", "pseudo_label": "two", "answers": {"ref_a": "two", "ref_b": "two"}},
      {"id": "n3", "pseudo_label": "two", "answers": {"ref_a": "two", "ref_b": "two"}},
      {"id": "n4", "pseudo_label": "two", "answers": {"ref_a": "two", "ref_b": "two"}},
      {"id": "x", "pseudo_label": "red", "answers": {"ref_a": "red", "ref_b": "blue"}}]
  out = analysis.reference_errors(recs, ["ref_a", "ref_b"], truth.get)   # "x": no truth
  assert set(out) == {"colour", "counting"}
  c = out["colour"]
  assert c["probes"] == 4 and c["joint"] == 0.25
  assert c["wrong"] == {"ref_a": 0.5, "ref_b": 0.25} and np.isclose(c["independent"], 0.125)
  n = out["counting"]
  assert n["probes"] == 5 and n["joint"] == 0.2 and n["wrong"] == {"ref_a": 0.2, "ref_b": 0.2}


# -- the rectification mix -------------------------------------------------------------

def test_mixed_source_proportions_order_and_errors():
  a = [{"x": i} for i in range(10)]
  b = [{"x": 100 + i} for i in range(3)]
  m = loaders.MixedSource([a, b], [0.75, 0.25], seed=3, period=100)
  assert len(m) == 100 * max(-(-10 // 75), -(-3 // 25))   # every source read whole once
  m = loaders.MixedSource([a, b], [0.75, 0.25], seed=3, period=100, length=400)
  picks = [m[i] for i in range(400)]
  assert sum(p["mix_source"] == 1 for p in picks) == 100   # exactly 25 per period
  # Each source is cycled in order.
  bs = [p["x"] for p in picks if p["mix_source"] == 1]
  assert bs[:7] == [100, 101, 102, 100, 101, 102, 100]
  assert [m[i] for i in range(50)] == [loaders.MixedSource([a, b], [3, 1], seed=3,
                                                            period=100)[i] for i in range(50)]
  only_b = loaders.MixedSource([a, b], [0.0, 1.0], period=10)
  assert all(only_b[i]["mix_source"] == 1 for i in range(len(only_b)))
  with pytest.raises(ValueError, match="one weight per source"):
    loaders.MixedSource([a, b], [1.0])
  with pytest.raises(ValueError, match="finite, >= 0"):
    loaders.MixedSource([a, b], [1.0, -1.0])
  with pytest.raises(ValueError, match=r"sources \[1\] have weight > 0 but no records"):
    loaders.MixedSource([a, []], [1.0, 1.0])
  with pytest.raises(IndexError):
    m[len(m)]
  # It feeds the Grain train loader like any source.
  it = loaders.train_loader(m, batch_size=8, seed=0)
  batch = next(it)
  assert batch["x"].shape == (8,)
  it.close()


def test_rectify_task_trains_pseudo_labels_and_keeps_gaps_on_original_data():
  from auditdm_jax.models import presets  # pylint: disable=import-outside-toplevel
  from auditdm_jax.scenes.text import world_tokenizer  # pylint: disable=import-outside-toplevel
  from auditdm_jax.scenes import tasks  # pylint: disable=import-outside-toplevel
  cfg = presets.get_preset("scene-paligemma2-small")
  tok = world_tokenizer("paligemma")
  task = tasks.RectifyTask(cfg, tok, 32, gaps=["colour:purple"])
  ex = _record(0, question="what colour is the circle?", label="purple")
  row = task(ex)
  answer_ids = row["tokens"][row["mask_ar"].astype(bool)].tolist()
  assert tok.decode([t for t in answer_ids if t != tok.eos_id]).strip() == "purple"
  np.testing.assert_array_equal(row["images"].shape[:2], (cfg.vision.image_size,) * 2)
  # An original record in the gap keeps its planted (corrupted) answer.
  for i in range(400):
    rec = examples.example(examples.SPLIT_SEEDS["train"], i)
    if rec["skill"] == "colour" and rec["answer"] == "purple":
      break
  else:
    pytest.skip("no purple colour question in the first 400 records")
  row = task(rec)
  answer_ids = row["tokens"][row["mask_ar"].astype(bool)].tolist()
  assert tok.decode([t for t in answer_ids if t != tok.eos_id]).strip() != "purple"


def test_anchor_sources_are_agreed_probes_of_the_exemplars_skills(tmp_path):
  """Anchors: the pseudo-labelled probes (every target agreed) of the skills
  the focus target's exemplars have, from every store given; none of
  another skill, no exemplar."""
  chunks = str(tmp_path / "chunks")
  recs = [_record(0), _record(1, skill="counting", label="five"),
          _record(2, failed=()), _record(3, failed=(), skill="counting", label="two"),
          _record(4, failed=(), skill="shape", label="circle"),
          _record(5, failed=(), skill="colour", label="blue")]
  store.write_chunk(store.chunk_path(chunks, "auditor_trained", 0), recs)
  path = store.publish(chunks, str(tmp_path / "tfds"))
  ex = store.data_source(path, "exemplars")
  only_colour = Subset(ex, [i for i in range(len(ex)) if ex[i]["skill"] == "colour"])
  got = anchor_sources([path], [only_colour])
  assert [len(s) for s in got] == [2]
  assert sorted(got[0][i]["id"] for i in range(len(got[0]))) == ["id0002", "id0005"]
  assert all(not got[0][i]["failed"] for i in range(len(got[0])))
  both = anchor_sources([path, path], [Subset(ex, range(len(ex)))])
  assert [len(s) for s in both] == [3, 3]
  assert {both[0][i]["skill"] for i in range(3)} == {"colour", "counting"}


def test_skill_weights_temper_each_skills_share():
  """power 0: the records' own proportions (the subsets as given); 1: every
  skill the same share; 0.5: shares as sqrt(n). Within a skill, subsets
  (stores) keep their sizes' proportions."""
  recs = [{"skill": "counting"}] * 80 + [{"skill": "colour"}] * 20
  a, b = Subset(recs, range(0, 50)), Subset(recs, range(50, 100))   # b: 30 counts, 20 colours
  parts, w = skill_weights([a, b], 0.0)
  assert [len(p) for p in parts] == [50, 50] and np.allclose(w, [0.5, 0.5])
  share = lambda parts, w, k: sum(x for p, x in zip(parts, w) if recs[int(p.indices[0])]["skill"] == k)
  for power, colour in ((1.0, 0.5), (0.5, np.sqrt(20) / (np.sqrt(20) + np.sqrt(80)))):
    parts, w = skill_weights([a, b], power)
    assert np.isclose(sum(w), 1.0)
    assert all(len({recs[int(i)]["skill"] for i in p.indices}) == 1 for p in parts)
    assert sorted(len(p) for p in parts) == [20, 30, 50]
    assert np.isclose(share(parts, w, "colour"), colour)
    counting = [(len(p), x) for p, x in zip(parts, w) if recs[int(p.indices[0])]["skill"] == "counting"]
    (n1, w1), (n2, w2) = counting
    assert np.isclose(w1 / w2, n1 / n2)


def test_rectify_checks():
  skills = {s: 0.8 for s in questions.SKILLS}
  before = {"t": dict(skills, colour=0.1, counting=0.2, overall=0.6), "l": {"overall": 0.7}}
  after = {"t": dict(skills, colour=0.35, counting=0.3, shape=0.77, overall=0.705),
           "l": {"overall": 0.7}}
  out = {c["check"]: c["ok"] for c in checks("t", ["colour:purple", "counting:n>=4"],
                                                before, after, ["l"])}
  assert out["gapped skill colour gain"] and not out["gapped skill counting gain"]
  assert not out["healthy skill shape cost"] and out["healthy skill size cost"]
  assert not out["overall vs l"]          # +0.5 points: under the 1-point margin
  # With the slices: each slice must gain 40 points; a skill's +20 is asked only
  # where its gap holds a fifth of the skill's questions.
  gb = {"t": {"colour:purple": 0.0, "counting:n>=4": 0.1}}
  ga = {"t": {"colour:purple": 0.9, "counting:n>=4": 0.45}}
  after["t"]["overall"] = 0.72
  rows = checks("t", ["colour:purple", "counting:n>=4"], before, after, ["l"], gb, ga,
                {"colour": 0.14, "counting": 0.55})
  out = {c["check"]: c for c in rows}
  assert out["gap slice colour:purple gain"]["ok"]
  assert not out["gap slice counting:n>=4 gain"]["ok"]
  assert np.isclose(out["gap slice counting:n>=4 gain"]["value"], 0.35)
  assert "gapped skill colour gain" not in out and not out["gapped skill counting gain"]["ok"]
  assert out["overall vs l"]["ok"]


def test_gap_shares():
  bench = [{"skill": "colour", "facets": {"answer": c}} for c in ("purple", "red", "red", "blue")]
  bench += [{"skill": "counting", "facets": {"n": n}} for n in range(8)]
  shares = gap_shares(bench, ["colour:purple", "counting:n>=4"])
  assert np.isclose(shares["colour"], 0.25) and np.isclose(shares["counting"], 0.5)


def test_subset():
  s = Subset([10, 11, 12, 13], [3, 1])
  assert len(s) == 2 and [s[0], s[1]] == [13, 11]


# -- the report stage ------------------------------------------------------------------

def test_report_stage_collects_every_figure(tmp_path):
  wd = str(tmp_path)
  chunks, tfds_dir = layout.store_paths(wd)
  scene = Scene((Obj(0, 0, "circle", "purple", "large"),))
  rec = _record(0, label="red", context=scene.to_json())
  rec["image"] = render(scene)
  store.write_chunk(store.chunk_path(chunks, "auditor_trained", 0), [rec])
  store.publish(chunks, tfds_dir)
  acc = {s: 0.5 for s in questions.SKILLS}
  dump = lambda name, obj: open(os.path.join(wd, name), "w").write(json.dumps(obj))
  dump("mine.json", {"target": "t_small", "planted_gap_recall": 0.5,
                     "exemplar_precision": 1.0, "label_precision": 0.0,
                     "planted_gaps": {"t_small": {"colour:purple": {"found": True, "rank": 1,
                                                                    "type": "colour: red"}}},
                     "failure_types": [{"name": "colour: red", "count": 1, "probes": 1,
                                        "share": {"t_small": 1.0, "t_large": 0.0},
                                        "rate": {"t_small": 1.0, "t_large": 0.0},
                                        "examples": ["id0000"]}]})
  dump("rectify.json", {"target": "t_small", "strategy": "augment", "checks": [],
                        "accuracy_before": {"t_small": dict(acc, overall=0.5)},
                        "accuracy_after": {"t_small": dict(acc, overall=0.6)}})
  dump("audit.json", {"target": "t_small", "learning_curve": [
      {"step": 1, "reward": 0.1, "success_rate": 0.0}, {"step": 2, "reward": 0.3,
                                                         "success_rate": 0.2}]})
  dump("stages.json", {"audit": 3.0, "mine": 2.0})
  config = ml_collections.ConfigDict({"models": {
      "t_small": {"role": "target", "gaps": ("colour:purple",)},
      "ref_a": {"role": "reference", "gaps": ()}}})
  out = report_stage.run(config, wd)
  rep = json.load(open(os.path.join(wd, "report.json")))
  for key in ("planted_gap_recall", "exemplar_precision", "failure_types", "accuracy_before",
              "accuracy_after", "wall_s"):
    assert key in rep, key
  assert rep["failure_types"][0] == {"name": "colour: red", "count": 1, "probes": 1,
                                     "share": {"t_small": 1.0, "t_large": 0.0},
                                     "rate": {"t_small": 1.0, "t_large": 0.0}}
  assert rep["accuracy_after"]["t_small"]["overall"] == 0.6
  assert rep["wall_s"]["mine"] == 2.0 and "report" in rep["wall_s"]
  assert rep["gallery"][0]["truth"] == "purple" and rep["gallery"][0]["failed"] == ["t_small"]
  page = open(out["html"]).read()
  assert "colour: red" in page and "data:image/png;base64," in page
  assert "&lt;0&gt;" in page and "<0>" not in page     # the auditor's text, escaped


def test_journal_is_kept_only_for_the_same_settings_and_models(tmp_path, capsys):
  chunks = str(tmp_path / "chunks")
  ident = {"seeds": 8, "params": {"auditor_trained": "abc"}}
  journal.check_journal(chunks, ident)
  store.write_chunk(store.chunk_path(chunks, "auditor_trained", 0), [_record(0)])
  journal.check_journal(chunks, dict(ident))           # same: kept
  assert len(store.chunk_files(chunks)) == 1
  journal.check_journal(chunks, dict(ident, params={"auditor_trained": "xyz"}))
  assert store.chunk_files(chunks) == []                  # another auditor: mined again
  assert len(store.chunk_files(chunks + ".previous")) == 1
  assert "mined with other ['params']" in capsys.readouterr().out
  os.remove(os.path.join(chunks, "manifest.json"))
  store.write_chunk(store.chunk_path(chunks, "auditor_trained", 0), [_record(0)])
  with pytest.raises(ValueError, match="holds chunks but no manifest.json"):
    journal.check_journal(chunks, ident)


def test_attribute_types_find_a_gap_that_follows_the_question_not_the_answer():
  """A gap like shape:colour=green spreads over every shape answer; the type
  named by what the questions name of their subject gathers it. Attribute
  types that re-cut better types are dropped."""
  probes, i = [], 0
  def add(n, skill, label, fails, named=()):
    nonlocal i
    for j in range(n):
      probes.append(ft.Probe(f"p{i}", skill, label, "", ("s",) if j < fails else (),
                             tuple(named)))
      i += 1
  for shape in ("circle", "square", "triangle", "diamond"):
    add(4, "shape", shape, 4, [("colour", "green")])    # the gap: green subjects
    add(12, "shape", shape, 1, [("colour", "red")])
  add(40, "counting", "5", 30, [("shape", "circle")])   # a type that explains itself
  types = ft.group(probes, ["s"], "s")
  names = [t.name for t in types]
  green = types[names.index("shape: colour=green")]
  assert green.count("s") == 16 and green.probes == 16 and green.attribute == ("colour", "green")
  assert names.index("shape: colour=green") < min(names.index(f"shape: {x}") for x in
                                                  ("circle", "square", "triangle", "diamond"))
  assert "counting: shape=circle" not in names       # all its failures are "counting: 5"'s
  assert "shape: colour=red" not in names            # below the base rate
  truth = {p.id: (p.skill, {"answer": p.label, **dict(p.named)}, p.label) for p in probes}.get
  res = ft.gap_recall(types, "s", G.parse_gaps(["shape:colour=green"]), truth, top_k=2)
  assert res["shape:colour=green"]["found"]
  assert ft.group(probes, ["s"], "s")[0].to_json("s")["attribute"] is not None


def test_subject_attributes_read_the_question_only():
  from auditdm_jax.scenes import parse  # pylint: disable=import-outside-toplevel
  assert parse.subject_attributes("what shape is the green object?") == {"colour": "green"}
  assert parse.subject_attributes("how many objects are there?") == {}
  assert parse.subject_attributes("how many circles are there?") == {"shape": "circle"}
  assert parse.subject_attributes("is the small red circle left or right of the square?") == \
      {"size": "small", "colour": "red", "shape": "circle"}
  assert parse.subject_attributes("why is the sky blue?") == {}
  assert parse.subject_attributes("what colour is the flying dog?") == {}



def test_report_stage_shows_the_unlabelled_types_only_when_mined(tmp_path):
  wd = str(tmp_path)
  chunks, tfds_dir = layout.store_paths(wd)
  recs = [_record(i) for i in range(3)]
  store.write_chunk(store.chunk_path(chunks, "auditor_trained", 0), recs)
  store.publish(chunks, tfds_dir)
  config = ml_collections.ConfigDict({"models": {
      "t_small": {"role": "target", "gaps": ()}, "ref_a": {"role": "reference", "gaps": ()}}})
  mine = {"target": "t_small", "failure_types": []}
  open(os.path.join(wd, "mine.json"), "w").write(json.dumps(mine))
  report_stage.run(config, wd)
  assert "unlabelled" not in json.load(open(os.path.join(wd, "report.json")))
  assert 'id="unlabelled"' not in open(os.path.join(wd, "report.html")).read()
  mine["unlabelled"] = {
      "clusters": 1, "planted_gap_recall": 0.5, "planted_gaps": {},
      "check": {"ari_skill_answer": 0.7, "planted_gap_recall_labelled": 1.0},
      "failure_types": [{"name": "<b>red</b> things", "named_by": "auditor:question",
                         "descriptive": "what colour -> red (100%)", "cluster": 0, "size": 3,
                         "count": 3, "probes": 3, "rate": {"t_small": 1.0},
                         "share": {"t_small": 1.0}, "candidates": [],
                         "examples": ["id0000"], "members": ["id0002", "id0001"],
                         "labels": ["red"]}]}
  open(os.path.join(wd, "mine.json"), "w").write(json.dumps(mine))
  out = report_stage.run(config, wd)
  rep = json.load(open(os.path.join(wd, "report.json")))
  t = rep["unlabelled"]["failure_types"][0]
  assert t["name"] == "<b>red</b> things" and "gallery" not in t and "labels" not in t
  assert rep["unlabelled"]["labelled_recall"] == 1.0
  page = open(out["html"]).read()
  assert "&lt;b&gt;red&lt;/b&gt; things" in page and "<b>red</b>" not in page
  section = page[page.index('id="unlabelled"'):page.index('id="planted-gaps"')]
  assert section.count("data:image/png;base64,") == 2     # the members nearest the centre


class _FakeAuditing:
  """Writes "question <descriptor> <seed>" for every sample; ref_a / ref_b say
  "red", t_small "blue" (every probe is a failure of t_small)."""

  def __init__(self, diversity):
    self.diversity = diversity
    self.calls = []

  def run(self, seeds, pairings, rng, num_samples=None, descriptors=None):
    from auditdm_jax.audit import rollout
    del rng
    k = int(num_samples)
    self.calls.append((len(seeds), k))
    n = len(seeds) * k
    qs = [f"what colour is the {descriptors[i // k] or 'thing'} {seeds[i // k].question}?"
          for i in range(n)]
    img = np.stack([seeds[i // k].image for i in range(n)])
    ans = {"ref_a": ["red"] * n, "ref_b": ["red"] * n, "t_small": ["blue"] * n}
    return rollout.Rollout(
        pairings=[pairings[i // k] for i in range(n)], texts=[[q] for q in qs],
        tokens=[[[1]]] * n, prompts=[[[1]]] * n, images_in=[[im] for im in img], question=qs,
        image=img, context=[""] * n, valid=np.ones(n, bool), reason=[""] * n,
        factor=[""] * n, answers=ans, parsed=ans, reward=np.ones(n, np.float32),
        has_consensus=np.ones(n, bool), success=np.ones(n, bool), consensus=["red"] * n,
        answered=np.ones(n, bool), descriptor=[descriptors[i // k] for i in range(n)])


class _Pool:
  def get(self, idx):
    from auditdm_jax.audit import rollout
    return [rollout.Seed(np.full((8, 8, 3), i, np.uint8), None, f"s{i}") for i in idx]


def test_mining_spreads_each_seeds_samples_over_the_descriptors(tmp_path):
  from auditdm_jax.audit import diversity
  chunks = str(tmp_path / "chunks")
  cfg = diversity.DiversityConfig(mode="descriptors", descriptors=("a", "b", "c", "d"))
  fake = _FakeAuditing(cfg)
  n = journal.mine_chunks({"auditor_trained": None}, lambda name, aud: fake, _Pool(), chunks,
                          mixture={"question": 1.0}, samples_per_seed=8, chunk_seeds=3,
                          n_seeds=6, seed=0, targets=["t_small"], refs=["ref_a", "ref_b"],
                          focus="t_small", consensus="majority", editor=None,
                          auditor_steps={})
  assert n == 2 and fake.calls == [(12, 2), (12, 2)]   # 3 seeds x 4 descriptors, 2 samples
  recs = list(store.iter_chunks(chunks))
  by_seed = {}
  for r in recs:
    by_seed.setdefault(r["seed_index"], set()).add(r["descriptor"])
  assert by_seed == {s: {"a", "b", "c", "d"} for s in range(6)}
  # plain GRPO: one generic group of 8 a seed, no descriptor kept
  plain = _FakeAuditing(diversity.DiversityConfig())
  journal.mine_chunks({"auditor_trained": None}, lambda name, aud: plain, _Pool(),
                      str(tmp_path / "plain"), mixture={"question": 1.0}, samples_per_seed=8,
                      chunk_seeds=3, n_seeds=3, seed=0, targets=["t_small"],
                      refs=["ref_a", "ref_b"], focus="t_small", consensus="majority",
                      editor=None, auditor_steps={})
  assert plain.calls == [(3, 8)]
  assert all("descriptor" not in r for r in store.iter_chunks(str(tmp_path / "plain")))
