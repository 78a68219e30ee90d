"""Checks the import rules of docs/architecture.md on the source tree."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "auditdm_jax")

# package (dotted prefix) -> packages it may import from auditdm_jax
ALLOWED = {
    "auditdm_jax.utils": {"auditdm_jax.utils"},
    "auditdm_jax.models": {"auditdm_jax.models", "auditdm_jax.utils"},
    "auditdm_jax.stages": {"auditdm_jax.models", "auditdm_jax.utils", "auditdm_jax.stages",
                           "auditdm_jax.sharding", "auditdm_jax.sampling",
                           "auditdm_jax.scenes", "auditdm_jax.data", "auditdm_jax.train",
                           "auditdm_jax.eval", "auditdm_jax.audit", "auditdm_jax.mine",
                           "auditdm_jax.report", "auditdm_jax.pipeline"},
    "auditdm_jax.pipeline": {"auditdm_jax.models", "auditdm_jax.utils", "auditdm_jax.sharding",
                             "auditdm_jax.sampling", "auditdm_jax.scenes", "auditdm_jax.data",
                             "auditdm_jax.train", "auditdm_jax.eval", "auditdm_jax.audit",
                             "auditdm_jax.mine", "auditdm_jax.pipeline",
                             "auditdm_jax.diffusion"},
    "auditdm_jax.config_check": {"auditdm_jax.models", "auditdm_jax.scenes",
                                 "auditdm_jax.stages", "auditdm_jax.audit", "auditdm_jax.data",
                                 "auditdm_jax.utils", "auditdm_jax.pipeline",
                                 "auditdm_jax.sharding"},
    "auditdm_jax.audit": {"auditdm_jax.models", "auditdm_jax.sharding", "auditdm_jax.sampling",
                          "auditdm_jax.train", "auditdm_jax.eval", "auditdm_jax.audit",
                          "auditdm_jax.utils"},
    "auditdm_jax.mine": {"auditdm_jax.audit", "auditdm_jax.mine",
                         "auditdm_jax.data", "auditdm_jax.sharding", "auditdm_jax.train",
                         "auditdm_jax.utils", "auditdm_jax.models.inputs"},
    "auditdm_jax.report": {"auditdm_jax.utils", "auditdm_jax.data.records",
                           "auditdm_jax.report"},
    # The scene world's adapters to the generic rooms' interfaces (listed
    # before the world itself: the first matching prefix is the rule).
    "auditdm_jax.scenes.editor": {"auditdm_jax.scenes", "auditdm_jax.audit.editor"},
    "auditdm_jax.scenes.mining": {"auditdm_jax.scenes", "auditdm_jax.mine.failure_types"},
    "auditdm_jax.scenes.records": {"auditdm_jax.scenes", "auditdm_jax.data.records"},
    "auditdm_jax.scenes.tasks": {"auditdm_jax.scenes", "auditdm_jax.models",
                                 "auditdm_jax.train.batches"},
    "auditdm_jax.scenes.vision": {"auditdm_jax.scenes", "auditdm_jax.models.siglip"},
    "auditdm_jax.scenes.benchmark": {"auditdm_jax.scenes", "auditdm_jax.eval.benchmark",
                                     "auditdm_jax.models", "auditdm_jax.sampling",
                                     "auditdm_jax.utils"},
    "auditdm_jax.scenes.tfds": {"auditdm_jax.scenes"},
    "auditdm_jax.scenes": {"auditdm_jax.scenes", "auditdm_jax.models.tokenizer"},
    "auditdm_jax.data": {"auditdm_jax.utils", "auditdm_jax.data"},
    "auditdm_jax.train": {"auditdm_jax.models", "auditdm_jax.sharding",
                          "auditdm_jax.data", "auditdm_jax.utils", "auditdm_jax.train"},
    "auditdm_jax.eval": {"auditdm_jax.models", "auditdm_jax.sampling",
                         "auditdm_jax.utils", "auditdm_jax.eval"},
    "auditdm_jax.diffusion": {"auditdm_jax.models", "auditdm_jax.sharding", "auditdm_jax.utils",
                              "auditdm_jax.diffusion"},
    "auditdm_jax.sharding": set(),
    "auditdm_jax.sampling": {"auditdm_jax.models", "auditdm_jax.sharding"},
    "auditdm_jax.tools": {"auditdm_jax.models", "auditdm_jax.sharding",
                          "auditdm_jax.config_check", "auditdm_jax.tools",
                          "auditdm_jax.pipeline", "auditdm_jax.diffusion",
                          "auditdm_jax.utils", "auditdm_jax.data"},
}
FORBIDDEN_EVERYWHERE = ("torch", "transformers", "diffusers")
# The generic rooms: they never import the scene world; the stages and the
# pipeline choose it by config and pass in what these need (docs/architecture.md).
GENERIC_ROOMS = ("models", "sampling", "train", "eval", "data", "audit", "mine", "report",
                 "diffusion")
SCENES = "auditdm_jax.scenes"


def _modules():
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        yield rel.removesuffix(".__init__"), path


def _imports(path):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module
      yield from (f"{node.module}.{a.name}" for a in node.names)


def test_import_rules():
  violations = []
  for mod, path in _modules():
    rule = next((v for k, v in ALLOWED.items() if mod == k or mod.startswith(k + ".")), None)
    for name in set(_imports(path)):
      top = name.split(".")[0]
      if top in FORBIDDEN_EVERYWHERE:
        violations.append(f"{mod} imports {name} (test-only dependency)")
      if name in ("auditdm_jax.main",) or name.startswith("auditdm_jax.main."):
        violations.append(f"{mod} imports auditdm_jax.main")
      if rule is None or not name.startswith("auditdm_jax."):
        continue
      if not any(name == a or name.startswith(a + ".") for a in rule):
        violations.append(f"{mod} imports {name}")
  assert not violations, "\n".join(violations)


def _absolute_imports(mod: str, path: str):
  """(line, dotted name) of every import of `path` (module `mod`), relative
  ones resolved against its package, top level and inside functions; with
  `from X import a` both X and X.a; importlib / __import__ calls with a
  constant name too."""
  package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield node.lineno, a.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - (node.level - 1)])
        module = f"{base}.{node.module}" if node.module else base
      else:
        module = node.module
      yield node.lineno, module
      for a in node.names:
        yield node.lineno, f"{module}.{a.name}"
    elif (isinstance(node, ast.Call) and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
          and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
               or (isinstance(node.func, ast.Attribute)
                   and node.func.attr == "import_module"))):
      yield node.lineno, node.args[0].value


def test_generic_rooms_never_import_the_scene_world():
  """models, sampling, train, eval, data, audit, mine, report and diffusion know
  nothing of the scene world: no import of auditdm_jax.scenes (absolute or
  relative, at the top or inside a function). The world's adapters live in
  scenes/ and the stages or the pipeline pass them in."""
  rooms = tuple(f"auditdm_jax.{r}" for r in GENERIC_ROOMS)
  checked, bad = 0, []
  for mod, path in _modules():
    if not any(mod == r or mod.startswith(r + ".") for r in rooms):
      continue
    checked += 1
    for line, name in _absolute_imports(mod, path):
      if name == SCENES or name.startswith(SCENES + "."):
        bad.append(f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line} imports {name}")
  assert checked > 50, checked   # the walk found the rooms
  assert not bad, "the generic rooms import the scene world:\n" + "\n".join(sorted(set(bad)))


def test_every_package_has_a_rule():
  packages = {m for m, p in _modules() if p.endswith("__init__.py")} - {"auditdm_jax"}
  uncovered = [p for p in packages
               if not any(p == k or p.startswith(k + ".") for k in ALLOWED)]
  assert not uncovered, f"add these to docs/architecture.md and ALLOWED: {uncovered}"


def _stage_modules():
  return {m: p for m, p in _modules() if m.startswith("auditdm_jax.stages.")}


def test_no_stage_imports_another_stage():
  """A stage is wiring: what two stages share lives in auditdm_jax.pipeline
  (or below), never in another stage's module."""
  violations = []
  for mod, path in _stage_modules().items():
    for name in set(_imports(path)):
      other = next((m for m in _stage_modules() if name == m or name.startswith(m + ".")), None)
      if other is not None and other != mod:
        violations.append(f"{mod} imports {name}")
      if name == "auditdm_jax.stages":
        violations.append(f"{mod} imports the stage registry")
  assert not violations, "\n".join(violations)


def test_every_stage_module_declares_its_stage():
  from auditdm_jax import stages   # pylint: disable=import-outside-toplevel
  declared = {s.run.__module__ for s in stages.STAGES}
  assert declared == set(_stage_modules()), (declared, set(_stage_modules()))
  assert len(set(stages.ORDER)) == len(stages.ORDER)


def test_stage_table_in_docs_is_the_declarations():
  """docs/architecture.md's stage table is exactly `stages.table()` (the
  declarations' reads and writes), so the two cannot drift apart."""
  from auditdm_jax import stages   # pylint: disable=import-outside-toplevel
  doc = open(os.path.join(os.path.dirname(ROOT), "docs", "architecture.md")).read()
  assert stages.table() in doc, ("docs/architecture.md's stage table differs from the "
                                 "declarations; paste stages.table():\n" + stages.table())


def test_model_name_suffixes_have_one_home():
  """`<auditor>_trained` and `<target>_rectified` are spelled only in
  pipeline/layout.py (code, not docstrings or comments)."""
  offenders = []
  for mod, path in _modules():
    if mod == "auditdm_jax.pipeline.layout":
      continue
    for node in ast.walk(ast.parse(open(path).read())):
      # the suffix as a piece of a name being built: f"{name}_trained", x + "_trained",
      # name.endswith("_trained")
      if (isinstance(node, ast.Constant) and isinstance(node.value, str)
          and node.value.startswith(("_trained", "_rectified"))):
        offenders.append(f"{mod}:{node.lineno}: {node.value!r}")
  assert not offenders, "\n".join(offenders)


def test_no_handle_ckpt_circle():
  """The handle imports the checkpoint code, never the other way round."""
  ckpt, handle = "auditdm_jax.models.ckpt", "auditdm_jax.models.handle"
  bad = [f"{mod} imports {name}" for mod, path in _modules()
         if mod == ckpt or mod.startswith(ckpt + ".")
         for name in sorted(set(_imports(path)))   # top level and inside functions
         if name == handle or name.startswith(handle + ".")]
  assert not bad, "\n".join(bad)
