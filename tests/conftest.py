"""Shared fixtures: one tiny random transformers model per family, saved with
`save_pretrained` and loaded through `auditdm_jax.models.load`."""

import pytest


@pytest.fixture(scope="session")
def hf_pg(tmp_path_factory):
  """(transformers PaliGemma 2, its directory, our loaded VLM)."""
  from auditdm_jax import models  # pylint: disable=import-outside-toplevel
  from tests import hf_reference as ref  # pylint: disable=import-outside-toplevel
  model = ref.paligemma2(seed=1)
  path = tmp_path_factory.mktemp("hf_pg2")
  model.save_pretrained(path)
  return model, str(path), models.load(str(path))


@pytest.fixture(scope="session")
def hf_g3(tmp_path_factory):
  """(transformers Gemma 3, its directory, our loaded VLM)."""
  from auditdm_jax import models  # pylint: disable=import-outside-toplevel
  from tests import hf_reference as ref  # pylint: disable=import-outside-toplevel
  model = ref.gemma3(seed=2)
  path = tmp_path_factory.mktemp("hf_g3")
  model.save_pretrained(path)
  return model, str(path), models.load(str(path))
