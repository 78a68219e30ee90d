"""Meshes, regex partition rules and logical activation constraints."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from auditdm_jax import sharding
from auditdm_jax.models import logical, presets, vlm


def test_resolve_axes():
  assert sharding.resolve_axes({"data": 2, "fsdp": -1, "model": 2}, 16) == {
      "data": 2, "fsdp": 4, "model": 2}
  for axes, n, msg in (({"data": 3, "fsdp": -1}, 16, "cannot fill"),
                       ({"data": -1, "fsdp": -1}, 8, "at most one -1"),
                       ({"data": 2, "fsdp": 2}, 8, "has 4 devices"),
                       ({}, 8, "at least one axis")):
    with pytest.raises(ValueError, match=msg):
      sharding.resolve_axes(axes, n)


def test_make_mesh_on_available_devices():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert mesh.devices.size == jax.device_count()


MESH = {"data": 2, "fsdp": 4, "model": 2}


def test_tensor_parallel_and_fsdp_specs():
  # q_einsum [L, N, D, H]: heads over model, FSDP on the largest free dim (D).
  spec = sharding.spec_for_param("llm/layers/attn/q_einsum/w", (26, 8, 2304, 256), MESH)
  assert spec == P(None, "model", "fsdp", None)
  # gating [L, 2, D, F]: F over model, FSDP on D.
  assert sharding.spec_for_param("llm/layers/mlp/gating_einsum", (26, 2, 2304, 9216),
                                 MESH) == P(None, None, "fsdp", "model")
  # Vocabulary rows over model x fsdp.
  assert sharding.spec_for_param("llm/embedder/input_embedding", (257152, 2304),
                                 MESH) == P(("model", "fsdp"), None)


def test_indivisible_axes_are_dropped_and_layers_never_sharded():
  # One key/value head cannot be split over model=2; FSDP then takes D.
  spec = sharding.spec_for_param("llm/layers/attn/kv_einsum/w", (18, 2, 1, 2048, 256), MESH)
  assert spec == P(None, None, None, "fsdp", None)
  # A stacked norm [L, D]: the layer axis stays whole even when it is largest.
  spec = sharding.spec_for_param("llm/layers/pre_ffw_norm/scale", (4096, 64), MESH,
                                 fsdp_min_size=1)
  assert spec == P(None, "fsdp")
  # Small arrays stay replicated.
  assert sharding.spec_for_param("llm/final_norm/scale", (2304,), MESH) == P(None)


def test_rules_from_config_validation():
  rules = sharding.rules_from_config([[r"embedder", [None, "model"]]])
  assert rules[-1] == (r".*", ())          # a catch-all is appended
  with pytest.raises(ValueError, match="bad regex"):
    sharding.rules_from_config([["(", []]])
  with pytest.raises(ValueError, match="must be"):
    sharding.rules_from_config(["embedder"])
  with pytest.raises(ValueError, match="has 3 entries"):
    sharding.spec_for_param("x", (4, 4), MESH, rules=((r".*", (None, None, None)),))


def test_every_real_preset_parameter_gets_a_valid_spec():
  for name in ("paligemma2-3b-448", "gemma3-27b"):
    specs = sharding.param_specs(vlm.abstract_params(presets.get_preset(name)),
                                 {"data": 1, "fsdp": 64, "model": 4})
    flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert flat and all(isinstance(s, P) for s in flat)


def test_logical_constraints_are_identity_outside_a_context():
  x = jax.numpy.ones((4, 3))
  assert logical.constrain(x, "batch", None) is x
  mesh = sharding.make_mesh()
  assert logical.spec_for((6, 5), ("batch", "vocab"), mesh, logical.ACTIVATION_RULES) in (
      P(None, None), P("fsdp", None))
