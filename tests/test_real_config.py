"""The real configs (configs/audit_paligemma2.py, audit_gemma3.py) on files
written here: tiny checkpoints under the release names (big_vision .npz for
PaliGemma 2 with its tokenizer, our Orbax format for the Gemma 3 auditor) and
big_vision-style jsonl datasets with PNG images. The config check names every
missing input before any model is built; with `runlocal=true` the whole
pipeline runs on CPU through `main`."""

import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import config_flags  # noqa: F401  (registers config parsing)
from PIL import Image

from auditdm_jax import config_check, models
from auditdm_jax.eval import metrics
from auditdm_jax.models import presets
from auditdm_jax.models.tokenizer import train_sentencepiece
from auditdm_jax.tools import plan as plan_lib
from tests.test_plan import _load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The metrics of the paper's tables, per real config.
METRICS = {"audit_paligemma2": {"vqa", "exact", "choice", "anls", "relaxed", "refcoco", "cider"},
           "audit_gemma3": {"choice", "circular", "pope", "mme"}}
WORDS = ("what colour is the cat how many dogs are there is it raining where is the red "
         "ball answer en yes no two three blue green a an of on in image describe the "
         "picture question write edit caption").split()


def _corpus():
  rng = np.random.default_rng(0)
  return [" ".join(rng.choice(WORDS, 8)) for _ in range(400)]


def write_checkpoints(ckpt_dir, config):
  """Tiny models at the config's checkpoint paths. The references share their
  weights, so that they always agree: a consensus to differ from, and
  exemplars to rectify on."""
  os.makedirs(ckpt_dir, exist_ok=True)
  pg_tok = train_sentencepiece(_corpus(), vocab_size=120, family="paligemma")
  g3_tok = train_sentencepiece(_corpus(), vocab_size=120, family="gemma3")
  pg_tok.save(os.path.join(ckpt_dir, "tokenizer.model"))   # beside the .npz files
  for i, (name, spec) in enumerate(sorted(config.models.items())):
    path = spec.checkpoint
    seed = 100 if spec.role in ("reference", "target") else i
    if "paligemma" in os.path.basename(path):
      cfg = presets.tiny_paligemma2(vocab_size=128, sliding_window=None)
      tok = pg_tok
    else:   # Gemma 3: the auditor, and the Gemma 3 config's target and references
      cfg = presets.tiny_gemma3(vocab_size=128, boi_id=g3_tok.boi_id, eoi_id=g3_tok.eoi_id)
      tok = g3_tok
    model = models.VLM.random(cfg, seed=seed, tokenizer=tok)
    if spec.role in ("reference", "target"):
      model = _answers_words(model)
    if spec.role == "target":
      model = _differs(model)
    if "paligemma" in os.path.basename(path):
      model.export_npz(path)
    else:
      model.save(path)


def _with_embedding(model, emb):
  params = jax.tree_util.tree_map(np.asarray, model.params)
  params["llm"]["embedder"]["input_embedding"] = emb
  return models.VLM(model.config, params, model.tokenizer)


def _answers_words(model):
  """A random model whose greedy answers are words: the (tied) embeddings
  of the pieces without a letter or digit (newlines, spaces, EOS and the
  other specials) scaled down 100 times, so their logits sit near 0 and a
  word piece with a positive logit wins. Random models otherwise answer
  most prompts with newlines, which parse as no answer: no consensus, no
  exemplars."""
  tok = model.tokenizer
  text = [tok.decode([i]) for i in range(tok.vocab_size)]
  quiet = [i for i, t in enumerate(text) if not any(c.isalnum() for c in t)
           or i in (tok.eos_id, tok.bos_id, tok.pad_id) or re.fullmatch(r"\s*<[^>]*>\s*", t)]
  emb = np.array(model.params["llm"]["embedder"]["input_embedding"])
  emb[quiet] *= 0.01
  return _with_embedding(model, emb)


def _differs(ref):
  """The references' model with the embeddings (tied: input and output) of
  its word pieces shifted by one along the vocabulary: it reads piece k
  as the references read piece k+1 and writes k where they write k+1. It
  always answers where they answer with words (a random target may answer
  only newlines, which parse as no answer) and rarely as they do: failure
  exemplars to rectify on."""
  tok = ref.tokenizer
  pieces = [i for i in range(tok.vocab_size) if tok.decode([i]).strip().isalpha()]
  emb = np.array(ref.params["llm"]["embedder"]["input_embedding"])
  emb[pieces] = emb[pieces[1:] + pieces[:1]]
  return _with_embedding(ref, emb)


def _png(rng) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def benchmark_line(metric: str, i: int) -> dict:
  """Line i of a benchmark scored with `metric`, with the fields it needs
  (data/named.py): every answer, options and letters, circular groups (three
  rotations of a question), POPE splits, MME's two questions per image,
  RefCOCO boxes (COCO [x, y, w, h] in the 40 x 40 image's pixels), captions
  per image."""
  line = {"prefix": f"how many dogs {i}", "question_id": f"{metric}-{i}"}
  options = ["two", "yes", "blue"]
  if metric == "vqa":
    return dict(line, suffix=["two"] * 7 + ["three", "yes", "2"])
  if metric in ("exact", "relaxed"):
    return dict(line, suffix=["two", "12", "blue"][i % 3])
  if metric == "anls":
    return dict(line, suffix=["two dogs", "2 dogs"])
  if metric == "choice":
    return dict(line, options=options, suffix="ABC"[i % 3])
  if metric == "circular":
    shift = i % 3                      # the options rotated; the answer ("two") follows
    return dict(line, options=options[shift:] + options[:shift], suffix="ACB"[shift],
                group=f"q{i // 3}")
  if metric == "pope":
    return dict(line, suffix=["yes", "no"][i % 2], category=["random", "popular"][i // 3])
  if metric == "mme":
    return dict(line, suffix=["yes", "no"][i % 2], image_id=f"img{i // 2}",
                category=["existence", "count", "OCR"][i // 2])
  if metric == "refcoco":
    return dict(line, prefix=f"the dog on the left {i}", box=[2 + i, 3, 20, 15])
  if metric == "cider":
    return dict(line, suffix=["two dogs on grass", "a dog and a dog"], image_id=i)
  raise ValueError(f"no test lines for metric {metric!r}")


def write_data(config, n=6):
  """Every jsonl the config names, with n examples and their images; the
  benchmarks' lines carry what their metrics need."""
  rng = np.random.default_rng(1)
  specs = [config.data.seed_images, config.data.rectify_train,
           *config.data.benchmarks.values()]
  for spec in specs:
    base = os.path.dirname(spec.path)
    os.makedirs(os.path.join(base, "images"), exist_ok=True)
    lines = []
    for i in range(n):
      name = f"images/{i}.png"
      with open(os.path.join(base, name), "wb") as f:
        f.write(_png(rng))
      if spec.get("metric", ""):
        line = dict(benchmark_line(spec.metric, i), image=name)
      else:   # seed images, labelled data: today's big_vision lines
        line = {"image": name, "prefix": f"how many dogs {i}",
                "suffix": ["two", "yes", "blue"][i % 3]}
      lines.append(json.dumps(line))
    with open(spec.path, "w") as f:
      f.write("\n".join(lines) + "\n")


def test_missing_checkpoints_and_datasets_are_named_before_any_model(tmp_path):
  arg = f"ckpt_dir={tmp_path}/ckpts,data_dir={tmp_path}/data"
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check(_load("audit_paligemma2", arg))
  msg = str(e.value)
  for path in (f"{tmp_path}/ckpts/paligemma2-3b-pt-448.npz",
               f"{tmp_path}/ckpts/paligemma2-28b-pt-448.npz", f"{tmp_path}/ckpts/gemma3-4b-it",
               f"{tmp_path}/data/vqav2/train.jsonl", f"{tmp_path}/data/chartqa/test.jsonl"):
    assert path in msg, (path, msg)
  # The planner needs neither.
  config_check.check(_load("audit_gemma3", arg), check_inputs=False)
  # No data_dir at all: the data sections say the path is not given.
  with pytest.raises(config_check.ConfigError, match=r"data.seed_images: jsonl datasets "
                     r"need \['path'\]"):
    config_check.check(_load("audit_gemma3", f"ckpt_dir={tmp_path}"))
  # main exits 2 with the same message, without building or compiling a model.
  out = subprocess.run([sys.executable, "-m", "auditdm_jax.main",
                        f"--config=configs/audit_gemma3.py:{arg}",
                        f"--workdir={tmp_path}/w"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  assert f"{tmp_path}/ckpts/gemma3-27b-it" in out.stderr
  assert "== stage" not in out.stdout


def test_each_benchmark_declares_its_metric_and_its_records_are_checked(tmp_path):
  """The paper's benchmarks with the metric each is reported in; the config
  check reads a benchmark's first line and names a field its metric needs
  that is missing, and a benchmark that declares no metric."""
  from auditdm_jax.stages import evaluate  # pylint: disable=import-outside-toplevel
  want = {"audit_paligemma2": {"vqav2": "vqa", "gqa": "exact", "okvqa": "vqa",
                               "ai2d": "choice", "docvqa": "anls", "chartqa": "relaxed",
                               "refcoco": "refcoco", "coco_captions": "cider"},
          "audit_gemma3": {"seedbench_img": "choice", "mmtbench": "choice",
                           "mmbench_v11": "circular", "pope": "pope", "realworldqa": "choice",
                           "mmstar": "choice", "mmmu": "choice", "mme": "mme"}}
  for name, metric_of in want.items():
    c = _load(name, f"data_dir={tmp_path}/{name}")
    assert {b: s.metric for b, s in c.data.benchmarks.items()} == metric_of
    assert set(metric_of.values()) == METRICS[name]
    write_data(c)
    assert config_check.data_problems(c, check_inputs=True) == []
    assert evaluate.problems(c) == []
  c = _load("audit_paligemma2", f"data_dir={tmp_path}/audit_paligemma2")
  path = c.data.benchmarks.refcoco.path
  with open(path) as f:
    lines = [json.loads(x) for x in f]
  del lines[0]["box"]
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(x) for x in lines) + "\n")
  got = config_check.data_problems(c, check_inputs=True)
  assert len(got) == 1 and got[0].startswith("data.benchmarks.refcoco: ") and (
      "line 1 has no 'box' (key 'box'), which metric 'refcoco' needs" in got[0]), got
  c.data.benchmarks.gqa.metric = ""
  assert evaluate.problems(c) == ["data.benchmarks.gqa declares no metric; give it one of "
                                  f"{sorted(metrics.METRICS)} (e.g. metric='vqa' for VQAv2)"]


def test_real_config_arguments_and_slices():
  c = _load("audit_paligemma2", "size=10b,res=896,slice=v6e-32,runlocal=false")
  assert c.models.target.preset == "paligemma2-10b-896" and c.slice == "v6e-32"
  w = plan_lib.workload(c)
  assert c.audit.optim.grad_accum == w.grad_accum == 1 and tuple(c.plan.slices) == ("v6e-32",)
  assert c.audit.prompts_per_step * c.audit.grpo.num_samples == w.global_batch == 256
  c.audit.max_new_tokens = 32         # an override of the audit section reaches the plan
  assert plan_lib.workload(c).max_new_tokens == 32 and not w.train_vision
  assert c.audit.editor == "none" and dict(c.audit.mixture) == {"question": 1.0}
  with pytest.raises(ValueError, match="slice must be one of"):
    _load("audit_gemma3", "slice=v9-8")
  with pytest.raises(ValueError, match="must be true or false"):
    _load("audit_gemma3", "runlocal=maybe")
  # An edit pairing needs an image editor.
  c.audit.mixture = {"question": 0.5, "edit": 0.5}
  with pytest.raises(config_check.ConfigError, match=r"pairings \['edit'\] need an image"):
    config_check.check(c, check_inputs=False)


def write_flux(config):
  """Tiny random FLUX.1 Kontext / dev pipelines (diffusers format) where the
  config's flux editor looks for them: the images are noise, the wiring real."""
  from tests import flux_reference  # pylint: disable=import-outside-toplevel
  flux_reference.save_pipeline(config.audit.editor_ckpt, kontext=True, seed=0)
  flux_reference.save_pipeline(config.audit.generator_ckpt, kontext=False, seed=10)


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("audit_paligemma2", ""), ("audit_gemma3", ""),
                                        ("audit_paligemma2", ",editor=flux")])
def test_runlocal_runs_every_stage_on_files_written_here(tmp_path, name, extra):
  arg = f"ckpt_dir={tmp_path}/ckpts,data_dir={tmp_path}/data,runlocal=true{extra}"
  config = _load(name, arg)
  write_checkpoints(f"{tmp_path}/ckpts", config)
  write_data(config)
  if config.audit.editor == "flux":
    write_flux(config)
  config_check.check(config)
  out = subprocess.run([sys.executable, "-m", "auditdm_jax.main",
                        f"--config=configs/{name}.py:{arg}", f"--workdir={tmp_path}/w"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  w = tmp_path / "w"
  stages = json.loads((w / "stages.json").read_text())
  assert set(stages) >= {"init", "audit", "mine", "rectify", "eval", "report"}
  audit = json.loads((w / "audit.json").read_text())
  assert audit["steps"] == 2 and 0.0 <= audit["success_rate"]["trained"] <= 1.0
  if config.audit.editor == "flux":   # the image routes ran through FluxEditor
    assert set(audit["success_by_pairing"]) == {"edit", "caption_question"}, audit
    rows = [json.loads(x) for x in (w / "audit" / "metrics.jsonl").read_text().splitlines()]
    assert rows and min(r["invalid_rate"] for r in rows) < 1.0, rows
    assert "flux editor" in out.stdout + out.stderr
  mine = json.loads((w / "mine.json").read_text())
  assert mine["seeds"] == 4 and mine["probes"] >= 0
  ev = json.loads((w / "eval.json").read_text())
  benches = sorted(config.data.benchmarks)
  want = {b: {"metric": config.data.benchmarks[b].metric,
              "unit": metrics.UNITS[config.data.benchmarks[b].metric]} for b in benches}
  assert {u["metric"] for u in want.values()} == METRICS[name]   # every metric of its table
  assert ev["benchmarks"] == {b: dict(u, records=4) for b, u in want.items()}
  for m in ("target", *[k for k in config.models if k.startswith("ref_")]):
    got = ev["models"][m]["benchmarks"]
    assert sorted(got) == benches
    for b, rep in got.items():
      assert {k: rep[k] for k in ("metric", "unit")} == want[b], (m, b, rep)
      assert np.isfinite(rep["score"]) and rep["score"] >= 0.0 and rep["records"] == 4
  assert mine["exemplars"] > 0, mine          # the references agree; the target differs
  # Real records carry no skill: the failure types are the unlabelled ones.
  assert mine["failure_types_from"] == "unlabelled" and "unlabelled" in mine
  assert mine["failure_types_labelled"] and all(
      t["name"].startswith("other: ") for t in mine["failure_types_labelled"])
  rect = json.loads((w / "rectify.json").read_text())
  assert rect["benchmarks"] == want
  for b in benches:
    for key in ("benchmarks_before", "benchmarks_after"):
      rep = rect[key]["target"][b]
      assert {k: rep[k] for k in ("metric", "unit")} == want[b] and np.isfinite(rep["score"])
    g = rect["gain"][b]
    assert g["gain"] == pytest.approx(g["after"] - g["before"]) and g["unit"] == want[b]["unit"]
  # rectify's "before" is eval's figure (the same weights: one pass, journaled)
  assert ev["models"]["target"]["benchmarks"] == rect["benchmarks_before"]["target"]
  assert not rect["skipped"] and rect["train"]["steps"] == 2
  assert (w / "models" / "target_rectified").exists()
  assert (w / "report.html").exists()
