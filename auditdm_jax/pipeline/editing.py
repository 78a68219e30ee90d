"""The audit's image editor, built from the config (shared by audit and mine).

`audit.editor`:
  "scene"  the scene world's exact editor (contexts are scenes)
  "none"   real images, questions only
  "flux"   real images through FLUX.1 Kontext dev (edits, `audit.editor_ckpt`)
           and FLUX.1 dev (captions, `audit.generator_ckpt`): diffusers
           pipeline directories, local or gs://; `audit.flux` holds the
           sampling settings and optional Black Forest Labs single files that
           replace a pipeline's transformer or autoencoder.

`problems(config)` names every missing checkpoint before anything is loaded
or compiled; `build(config, mesh, image_size)` returns the Editor.
"""

from __future__ import annotations

from typing import Any

from auditdm_jax import sharding
from auditdm_jax.audit import editor as editor_lib
from auditdm_jax.scenes.editor import SceneEditor
from auditdm_jax.utils import fileio

# audit.flux defaults (FLUX.1 release settings: 28 steps, guidance 2.5 for
# Kontext edits and 3.5 for dev; 1024 px generations).
FLUX_DEFAULTS = dict(steps=28, edit_guidance=2.5, generate_guidance=3.5, resolution=1024,
                     batch=4, auto_resize=True, dtype="bfloat16", max_sequence_length=512,
                     editor_transformer="", generator_transformer="", autoencoder="", seed=0)
COMPONENTS = ("scheduler", "transformer", "vae", "text_encoder", "text_encoder_2",
              "tokenizer", "tokenizer_2")
EDITORS = {"scene": SceneEditor, "none": editor_lib.QuestionsOnly}
# Pairings each editor can produce (None: all of them).
PAIRINGS = {"scene": None, "none": ("question",), "flux": None}
# Editors built from checkpoints (`build`), not by name alone.
BUILT = ("flux",)


def get_editor(name: str) -> editor_lib.Editor:
  if name in EDITORS:
    return EDITORS[name]()
  if name in BUILT:
    raise ValueError(f"editor {name!r} is built from its checkpoints "
                     f"(auditdm_jax.pipeline.editing.build), not by name")
  raise ValueError(f"unknown editor {name!r}; available: {sorted(EDITORS) + list(BUILT)}")


def flux_settings(audit) -> dict[str, Any]:
  given = dict(audit.get("flux", {}) or {})
  unknown = sorted(set(given) - set(FLUX_DEFAULTS))
  if unknown:
    raise ValueError(f"audit.flux: unknown settings {unknown}; known: {sorted(FLUX_DEFAULTS)}")
  return {**FLUX_DEFAULTS, **given}


def routes(config) -> tuple[bool, bool]:
  """(needs the edit pipeline, needs the generation pipeline): what the
  audit and mine mixtures use, or what a checkpoint is given for."""
  a = config.get("audit", {})
  mix = {**dict(a.get("mixture", {}) or {}),
         **dict(config.get("mine", {}).get("mixture", {}) or {})}
  needs_edit = any(v and k.startswith("edit") for k, v in mix.items())
  needs_gen = any(v and k.startswith("caption") for k, v in mix.items())
  return (needs_edit or bool(a.get("editor_ckpt", "")),
          needs_gen or bool(a.get("generator_ckpt", "")))


def _pipeline_problems(field: str, path: str, overrides: dict[str, str],
                       check_inputs: bool) -> list[str]:
  if not check_inputs:   # the planner's check: no checkpoint is needed
    return []
  if not path:
    return [f"audit.{field} is empty: the flux editor needs a diffusers FLUX pipeline "
            f"directory there"]
  if not fileio.exists(fileio.join(path, "model_index.json")):
    return [f"audit.{field}: {path} has no model_index.json (not a diffusers pipeline "
            f"directory, or missing)"]
  out = []
  for comp in COMPONENTS:
    if overrides.get(comp):
      continue
    if not fileio.exists(fileio.join(path, comp)):
      out.append(f"audit.{field}: {path} lacks {comp}/")
  for comp, p in overrides.items():
    if p and not fileio.exists(p):
      out.append(f"audit.flux: the {comp} checkpoint {p} does not exist")
  return out


def problems(config, check_inputs: bool = True) -> list[str]:
  """What is wrong with the configured editor: its settings and pairings, and
  with `check_inputs` every checkpoint it needs (nothing is loaded)."""
  a = config.get("audit", {})
  name = a.get("editor", "")
  if name != "flux":
    try:
      get_editor(name)
    except ValueError as e:
      return [f"audit.editor: {e}"]
    return []
  try:
    s = flux_settings(a)
  except ValueError as e:
    return [str(e)]
  out = []
  needs_edit, needs_gen = routes(config)
  if needs_edit:
    out += _pipeline_problems("editor_ckpt", a.get("editor_ckpt", ""),
                              {"transformer": s["editor_transformer"], "vae": s["autoencoder"]},
                              check_inputs)
  if needs_gen:
    out += _pipeline_problems("generator_ckpt", a.get("generator_ckpt", ""),
                              {"transformer": s["generator_transformer"], "vae": s["autoencoder"]},
                              check_inputs)
  if not (needs_edit or needs_gen):
    out.append("audit.editor is 'flux' but no pairing of audit.mixture / mine.mixture "
               "edits or captions")
  return out


def build(config, mesh=None, image_size: int = 224) -> editor_lib.Editor:
  """The Editor `audit.editor` names; FLUX pipelines are loaded and placed on
  `mesh`. `image_size`: the answerers' input size (generations are resized to it)."""
  a = config.audit
  if a.editor != "flux":
    return get_editor(a.editor)
  from auditdm_jax import diffusion  # pylint: disable=import-outside-toplevel
  s = flux_settings(a)
  found = problems(config)
  if found:
    raise ValueError("the flux editor cannot be built:\n  " + "\n  ".join(found))

  def load(path, transformer, mode):
    if not path:
      return None
    return diffusion.load(path, dtype=s["dtype"], transformer=transformer or None,
                          autoencoder=s["autoencoder"] or None, mesh=mesh,
                          max_sequence_length=int(s["max_sequence_length"]), mode=mode)

  edit_pipe = load(a.get("editor_ckpt", ""), s["editor_transformer"], "edit")
  gen_pipe = load(a.get("generator_ckpt", ""), s["generator_transformer"], "generate")
  if sharding.is_primary():
    print(f"flux editor: edits {a.get('editor_ckpt', '') or '-'}, captions "
          f"{a.get('generator_ckpt', '') or '-'}; {s['steps']} steps, {s['dtype']}, "
          f"batch {s['batch']}", flush=True)
  return editor_lib.FluxEditor(
      edit_pipe, gen_pipe,
      image_size=image_size, batch=int(s["batch"]), steps=int(s["steps"]),
      edit_guidance=float(s["edit_guidance"]), generate_guidance=float(s["generate_guidance"]),
      resolution=int(s["resolution"]), auto_resize=bool(s["auto_resize"]), seed=int(s["seed"]))
