"""auditdm_jax: AuditDM (arXiv 2512.16921) in JAX/Flax."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


_TEST = [
    "pytest>=8.0",
    "pytest-timeout>=2.3",
    "torch==2.13.0",
    "transformers>=5.0,<6",
    "safetensors>=0.4",
    # the FLUX parity reference (works with the torch pin)
    "diffusers==0.42.1",
    # property-based tests of every text parser
    "hypothesis>=6.100",
]

# bench/sampling.py's peers: transformers (above) and tunix's KV-cache Sampler.
# google-tunix 0.1.7 is the newest release; it caps safetensors < 0.8, which
# diffusers 0.42.1 and transformers >= 5.13 require, so the bench leaves
# diffusers out (only the FLUX tests use it) and pip settles on transformers
# 5.12.x. Give it its own virtualenv: installed over the test extra it would
# downgrade safetensors under diffusers and leave transformers 5.12 beside a
# `kernels` release it cannot import. (0.1.6 caps transformers <= 4.57.1;
# 0.1.5 has no Gemma 3 vision tower, which the bench's equality check needs.)
_BENCH = [r for r in _TEST if not r.startswith("diffusers")] + ["google-tunix==0.1.7"]


setuptools.setup(
    name="auditdm_jax",
    version="0.1.0",
    description=("AuditDM in JAX/Flax: an RL-trained auditor finds and fixes "
                 "capability gaps of PaliGemma 2 / Gemma 3 VLMs."),
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["auditdm_jax", "auditdm_jax.*"]),
    install_requires=_requirements(),
    extras_require={
        # TPU VMs: the libtpu-enabled jax build, and gcsfs for gs:// checkpoints
        # and datasets (read through fsspec).
        "tpu": ["jax[tpu]>=0.10.0", "gcsfs>=2024.1.0"],
        # Tests: torch and transformers are the numerical reference only;
        # auditdm_jax itself never imports them. torch is pinned to the CPU
        # build that is available without pulling CUDA wheels.
        "test": _TEST,
        # bench/sampling.py (see _BENCH); auditdm_jax never imports tunix.
        "bench": _BENCH,
    },
)
