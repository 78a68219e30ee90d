"""Fast checks of the scene-world training rows and the benchmark arithmetic
(the stage-level run is tests/test_pretrain_eval.py, marked slow)."""

import collections
import json

import numpy as np
import pytest

from auditdm_jax.eval import benchmark
from auditdm_jax.models import presets
from auditdm_jax.scenes import examples, gaps as gaps_lib
from auditdm_jax.scenes.questions import SKILLS
from auditdm_jax.scenes.text import world_tokenizer
from auditdm_jax.pipeline import evaluation
from auditdm_jax.stages import evaluate
from auditdm_jax.scenes import benchmark as scene_benchmark
from auditdm_jax.scenes import tasks


@pytest.fixture(scope="module")
def records():
  return [dict(examples.example(examples.SPLIT_SEEDS["train"], i), index=i) for i in range(80)]


def test_vqa_task_rows_supervise_only_the_answer(records):
  cfg = presets.get_preset("scene-paligemma2-small")
  tok = world_tokenizer("paligemma")
  task = tasks.VQATask(cfg, tok, seq_len=24)
  row = task(records[0])
  n = int(row["input_mask"].sum())
  answer = tok.decode(row["tokens"][row["mask_ar"].astype(bool)])
  assert answer == records[0]["answer"]
  assert row["mask_ar"][:n].sum() == len(tok.answer(records[0]["answer"]))
  assert row["images"].shape == (48, 48, 3) and row["images"].dtype == np.uint8


def test_vqa_task_corrupts_or_removes_the_gap_slice(records):
  cfg = presets.get_preset("scene-paligemma2-small")
  tok = world_tokenizer("paligemma")
  spec = "counting:n>=4"
  gapped = [r for r in records if gaps_lib.gap_mask([r], spec)[0]]
  clean = [r for r in records if not gaps_lib.gap_mask([r], spec)[0]]
  assert gapped and clean
  corrupt = tasks.VQATask(cfg, tok, 24, gaps=[spec], gap_mode="corrupt")
  remove = tasks.VQATask(cfg, tok, 24, gaps=[spec], gap_mode="remove")
  for r in gapped:
    row = corrupt(r)
    said = tok.decode(row["tokens"][row["mask_ar"].astype(bool)])
    assert said != r["answer"]
    assert remove(r) is None
  for r in clean:
    row = corrupt(r)
    assert tok.decode(row["tokens"][row["mask_ar"].astype(bool)]) == r["answer"]


def test_auditor_task_routes_produce_well_formed_text(records):
  cfg = presets.get_preset("scene-gemma3")
  tok = world_tokenizer("gemma3")
  task = tasks.AuditorTask(cfg, tok, seq_len=112, seed=3)
  from auditdm_jax.scenes.world import Scene
  from auditdm_jax.scenes.text import AUDITOR_TASKS
  routes = collections.Counter()
  for r in records[:24]:
    row = task(r)
    target = tok.decode(benchmark.strip_stops(row["tokens"][row["mask_ar"].astype(bool)],
                                              {tok.end_of_turn_id, tok.eos_id}))
    prompt = tok.decode(row["tokens"][~row["mask_ar"].astype(bool)
                                      & (row["tokens"] != cfg.image_token_id)])
    route, = [k for k, v in AUDITOR_TASKS.items() if v in prompt]
    routes[route] += 1
    ok, why = scene_benchmark.route_validity(route, Scene.from_json(r["scene"]), target)
    assert ok, (route, target, why)
  # Routes are drawn per record, not by index (the data cycles its skills
  # with the index): every route turns up, and question rows of every
  # skill parity.
  assert set(routes) == set(tasks.ROUTES)
  # The image block is expanded: one placeholder per soft token.
  assert int((row["tokens"] == cfg.image_token_id).sum()) == cfg.mm_tokens_per_image


def test_cell_labels_match_the_scene(records):
  labels = tasks.cell_labels(records[5]["scene"])
  scene = json.loads(records[5]["scene"])
  assert (labels[:, 0] > 0).sum() == len(scene)
  for r, c, *_ in scene:
    assert labels[r * 3 + c].min() > 0


def test_count_labels_count_each_cells_colour_and_shape(records):
  from auditdm_jax.scenes.world import Scene
  from auditdm_jax.scenes import vision
  labels = np.stack([tasks.cell_labels(r["scene"]) for r in records[:20]])
  counts = np.asarray(vision.count_labels(labels))
  assert counts.shape == labels.shape[:2] + (2,)
  for r, c in zip(records[:20], counts):
    scene = Scene.from_json(r["scene"])
    for cell in range(9):
      o = scene.at(cell // 3, cell % 3)
      want = (0, 0) if o is None else (len(scene.select(colour=o.colour)),
                                       len(scene.select(shape=o.shape)))
      assert tuple(c[cell]) == want
  assert vision.head_classes(True, True)[-2:] == (10, 10)


def test_phrase_labels_point_at_each_referring_phrase(records):
  """Every phrase label's position ends a "the <attrs>" phrase of the prompt
  that names exactly the labelled object; questions with two referring
  phrases (spatial, size) get two labels in order, counting / existence none."""
  from auditdm_jax.scenes.world import Scene
  cfg = presets.get_preset("scene-paligemma2-large")
  tok = world_tokenizer("paligemma")
  seen = {}
  for r in records:
    lab = tasks.phrase_labels(r, tok)
    assert lab.shape == (tasks.MAX_PHRASES, 3) and lab.dtype == np.int32
    scene, prompt = Scene.from_json(r["scene"]), tok.prompt(r["question"])
    valid = lab[lab[:, 0] >= 0]
    seen.setdefault(r["skill"], set()).add(len(valid))
    for pos, row, col in valid:
      text = tok.decode(prompt[:pos + 1])
      assert r["question"].startswith(text) and not r["question"][len(text)].isalpha()
      words = text.split(" the ")[-1].split()
      obj = scene.at(int(row), int(col))
      assert obj is not None and words[-1] in (obj.shape, "object")
      assert all(w in (obj.size, obj.colour, obj.shape, "object") for w in words)
    assert list(valid[:, 0]) == sorted(valid[:, 0])
  assert seen["spatial"] == seen["size"] == {2}
  assert seen["counting"] == seen["existence"] == {0}
  assert seen["colour"] == seen["binding"] == {1}
  row = tasks.VQATask(cfg, tok, 24, phrases=True)(records[0])
  np.testing.assert_array_equal(row["phrases"], tasks.phrase_labels(records[0], tok))
  with pytest.raises(ValueError, match="phrase labels index PaliGemma prompts"):
    tasks.VQATask(presets.get_preset("scene-gemma3"), world_tokenizer("gemma3"), 24,
                  phrases=True)


def test_accuracy_report_by_hand():
  recs = [{"answer": "red", "skill": "colour", "facets": json.dumps({"answer": "red", "colour": "red"})},
          {"answer": "purple", "skill": "colour",
           "facets": json.dumps({"answer": "purple", "colour": "purple"})},
          {"answer": "four", "skill": "counting", "facets": json.dumps({"answer": "four", "n": 4})},
          {"answer": "two", "skill": "counting", "facets": json.dumps({"answer": "two", "n": 2})}]
  answers = ["Red.", "blue", "4", "three"]
  rep = scene_benchmark.accuracy_report(recs, answers, ["colour:purple", "counting:n>=4"])
  assert rep["accuracy"]["colour"] == 0.5
  assert rep["accuracy"]["counting"] == 0.5
  assert rep["accuracy"]["overall"] == 0.5
  assert rep["gap_accuracy"] == {"colour:purple": 0.0, "counting:n>=4": 1.0}
  assert rep["healthy"]["colour"] == 1.0 and rep["healthy"]["counting"] == 0.0
  assert np.isnan(rep["accuracy"]["shape"])
  assert json.loads(benchmark.dumps(rep))["accuracy"]["shape"] is None


def test_checks_follow_the_targets():
  acc = {s: 0.95 for s in SKILLS}
  acc["overall"] = 0.95
  ok = evaluate.checks_for("ref", "reference", [], {"accuracy": acc, "gap_accuracy": {}})
  assert all(c["ok"] for c in ok) and len(ok) == len(SKILLS) + 1
  acc_t = dict(acc, counting=0.3)
  rep = {"accuracy": acc_t, "gap_accuracy": {"counting:n>=4": 0.3}}
  checks = evaluate.checks_for("t", "target", ["counting:n>=4"], rep)
  assert not any(c["check"] == "healthy skill counting" for c in checks)
  assert all(c["ok"] for c in checks)
  rep_bad = {"accuracy": acc_t, "gap_accuracy": {"counting:n>=4": 0.7}}
  bad = [c for c in evaluate.checks_for("t", "target", ["counting:n>=4"], rep_bad) if not c["ok"]]
  assert [c["check"] for c in bad] == ["gap counting:n>=4"]


def test_cached_report_is_keyed_by_weights(records, tmp_path, monkeypatch):
  """The eval cache: the same weights on the same records are measured once;
  other weights (one step of training later) are measured again."""
  from auditdm_jax import models  # pylint: disable=import-outside-toplevel
  cfg = presets.tiny_paligemma2(vocab_size=512, width=32, depth=1, image_size=48,
                                patch_size=16, vision_width=16, vision_depth=1,
                                sliding_window=None)
  m = models.VLM.random(cfg, seed=0, tokenizer=world_tokenizer("paligemma"))
  calls = []
  real = scene_benchmark.evaluate_answerer
  monkeypatch.setattr(scene_benchmark, "evaluate_answerer",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  recs = records[:8]
  first = evaluation.cached_report(str(tmp_path), m, recs, ["colour:purple"])
  again = evaluation.cached_report(str(tmp_path), m, recs, ["colour:purple"])
  assert len(calls) == 1 and again == first and "overall" in first["accuracy"]
  # An empty gap slice is NaN, fresh or cached (not None: checks compare it).
  spec = "binding:answer=small"
  recs_no_binding = [r for r in recs if r["skill"] != "binding"]
  for _ in range(2):
    rep = evaluation.cached_report(str(tmp_path), m, recs_no_binding, [spec])
    assert isinstance(rep["gap_accuracy"][spec], float) and np.isnan(rep["gap_accuracy"][spec])
  evaluation.cached_report(str(tmp_path), m, recs, [])                 # other gaps
  bumped = models.VLM(cfg, {**m.params, "llm": {**m.params["llm"], "final_norm": {
      "scale": np.asarray(m.params["llm"]["final_norm"]["scale"]) + 1e-3}}}, m.tokenizer)
  evaluation.cached_report(str(tmp_path), bumped, recs, ["colour:purple"])   # other weights
  assert len(calls) == 4
  # A corrupt cache entry is measured again (and rewritten), not a crash.
  for path in (tmp_path / "eval_cache").iterdir():
    path.write_text("{not json")
  again = evaluation.cached_report(str(tmp_path), m, recs, ["colour:purple"])
  assert len(calls) == 5 and again == first
  assert evaluation.cached_report(str(tmp_path), m, recs, ["colour:purple"]) == first
  assert len(calls) == 5
