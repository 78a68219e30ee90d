"""FluxEditor (audit/editor.py) and the editor's config (pipeline/editing.py),
with scripted pipelines: batching, rejections, per-row noise, sizes, and the
checks that name missing FLUX checkpoints before anything loads."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest

from auditdm_jax.audit import editor as editor_lib
from auditdm_jax.pipeline import editing


class FakePipe:
  """Records calls; an "image" is a constant colour derived from the noise."""

  latent_channels = 4

  def __init__(self, mode):
    self.mode, self.calls = mode, []

  def bucket(self, h, w, auto_resize=True):
    return (64, 96) if auto_resize else (h // 4 * 4, w // 4 * 4)

  def latent_grid(self, h, w):
    return 2 * (h // 4), 2 * (w // 4)

  def _render(self, noise, h, w):
    return np.stack([np.full((h, w, 3), int(abs(n.sum() * 1000)) % 256, np.uint8)
                     for n in noise])

  def edit(self, images, instructions, rng, *, steps, guidance, noise, auto_resize):
    self.calls.append(("edit", len(images), list(instructions), steps, guidance))
    h, w = self.bucket(images.shape[1], images.shape[2], auto_resize)
    assert noise.shape == (len(images), 4, *self.latent_grid(h, w))
    return self._render(noise, h, w)

  def generate(self, prompts, rng, height, width, *, steps, guidance, noise):
    self.calls.append(("generate", len(prompts), list(prompts), steps, guidance))
    return self._render(noise, height, width)


def _editor(**kw):
  return editor_lib.FluxEditor(FakePipe("edit"), FakePipe("generate"), image_size=24,
                               batch=3, steps=5, **kw)


def test_edit_batches_rejects_and_resizes():
  ed = _editor()
  imgs = np.random.default_rng(0).integers(0, 255, (4, 20, 28, 3)).astype(np.uint8)
  out = ed.edit(imgs, ["make it red", "", "  ", "add a dog"], [None] * 4)
  assert [r.ok for r in out] == [True, False, False, True]
  assert out[1].reason == "the edit command is empty" and out[1].image is None
  assert all(r.image.shape == (20, 28, 3) and r.context is None for r in out if r.ok)
  calls = ed.edit_pipe.calls
  assert len(calls) == 1 and calls[0][1] == 3            # padded to the fixed batch
  assert calls[0][2] == ["make it red", "add a dog", "add a dog"]
  assert calls[0][3:] == (5, 2.5)
  with pytest.raises(ValueError, match="4 images, 1 commands"):
    ed.edit(imgs, ["x"], [None])


def test_noise_depends_on_the_row_not_its_batch():
  ed = _editor()
  imgs = np.random.default_rng(1).integers(0, 255, (5, 16, 16, 3)).astype(np.uint8)
  cmds = [f"edit {i}" for i in range(5)]
  alone = ed.edit(imgs[3:4], cmds[3:4], [None])[0].image
  together = ed.edit(imgs, cmds, [None] * 5)[3].image
  np.testing.assert_array_equal(alone, together)
  other_seed = _editor(seed=1).edit(imgs[3:4], cmds[3:4], [None])[0].image
  assert not np.array_equal(alone, other_seed)


def test_generate_sizes_and_rejections():
  ed = _editor()
  out = ed.generate(["a cat on a mat", "", "two dogs"])
  assert [r.ok for r in out] == [True, False, True]
  assert out[1].reason == "the caption is empty"
  assert out[0].image.shape == (24, 24, 3)                 # the answerers' size
  name, n, prompts, steps, guidance = ed.gen_pipe.calls[0]
  assert (name, n, steps, guidance) == ("generate", 3, 5, 3.5)
  only_edit = editor_lib.FluxEditor(FakePipe("edit"), None, image_size=24)
  assert "generator_ckpt" in only_edit.generate(["x"])[0].reason
  assert ed.check_question([None, None], ["what is it?", " "]) == \
      [(True, ""), (False, "the question is empty")]
  assert ed.ground_truth([None], ["q"]) == [None] and ed.answer_space([None], ["q"]) == [None]


def test_editor_refuses_a_dev_pipeline_for_edits():
  with pytest.raises(ValueError, match="not a FLUX.1 Kontext pipeline"):
    editor_lib.FluxEditor(FakePipe("generate"), None, image_size=8)
  with pytest.raises(ValueError, match="needs an edit pipeline"):
    editor_lib.FluxEditor(None, None, image_size=8)


def _config(tmp_path, **audit):
  a = dict(editor="flux", editor_ckpt=str(tmp_path / "kontext"),
           generator_ckpt=str(tmp_path / "dev"),
           mixture=dict(question=0.5, edit=0.25, caption=0.25))
  a.update(audit)
  return ml_collections.ConfigDict(dict(audit=a, mine={}))


def _pipeline_dir(path, skip=()):
  os.makedirs(path)
  (path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
  for comp in editing.COMPONENTS:
    if comp not in skip:
      os.makedirs(path / comp)


def test_problems_name_missing_checkpoints(tmp_path):
  c = _config(tmp_path)
  found = editing.problems(c)
  assert any("editor_ckpt" in p and "kontext" in p and "model_index.json" in p for p in found)
  assert any("generator_ckpt" in p and "dev" in p for p in found)
  _pipeline_dir(tmp_path / "kontext")
  _pipeline_dir(tmp_path / "dev", skip=("text_encoder_2",))
  found = editing.problems(c)
  assert found == [f"audit.generator_ckpt: {tmp_path / 'dev'} lacks text_encoder_2/"]
  c.audit.flux = dict(editor_transformer=str(tmp_path / "flux1-kontext-dev.safetensors"))
  assert any("flux1-kontext-dev.safetensors does not exist" in p for p in editing.problems(c))
  c.audit.flux = dict(stpes=3)
  assert any("unknown settings ['stpes']" in p for p in editing.problems(c))
  assert any("no pairing" in p for p in editing.problems(
      _config(tmp_path, mixture=dict(question=1.0), editor_ckpt="", generator_ckpt="")))
  with pytest.raises(ValueError, match="cannot be built"):
    editing.build(_config(tmp_path / "nowhere"))


def test_problems_of_other_editors():
  c = ml_collections.ConfigDict(dict(audit=dict(editor="none"), mine={}))
  assert editing.problems(c) == []
  c.audit.editor = "dalle"
  assert "unknown editor 'dalle'" in editing.problems(c)[0]
  assert isinstance(editing.build(ml_collections.ConfigDict(
      dict(audit=dict(editor="none")))), editor_lib.QuestionsOnly)


def test_real_config_check_names_missing_flux_checkpoints(tmp_path):
  from auditdm_jax import config_check  # pylint: disable=import-outside-toplevel
  from tests.test_plan import _load  # pylint: disable=import-outside-toplevel
  c = _load("audit_paligemma2", f"ckpt_dir={tmp_path},editor=flux")
  config_check.check(c, check_inputs=False)   # the planner's check: structure only
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check(c)
  msg = str(e.value)
  assert "FLUX.1-Kontext-dev has no model_index.json" in msg
  assert "FLUX.1-dev has no model_index.json" in msg
