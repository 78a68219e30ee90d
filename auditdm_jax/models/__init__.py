"""The model layer: SigLIP, Gemma 2/3 decoders, PaliGemma 2 and Gemma 3 VLMs,
presets, tokenizer and checkpoint I/O. Knows nothing of auditing."""

from auditdm_jax.models.ckpt import CheckpointError, detect_format
from auditdm_jax.models.config import VLMConfig
from auditdm_jax.models.gemma import GemmaConfig
from auditdm_jax.models.handle import VLM, GenerateOutput, load
from auditdm_jax.models.presets import get_preset
from auditdm_jax.models.siglip import SigLIPConfig
from auditdm_jax.models.tokenizer import Tokenizer
from auditdm_jax.models.vlm import abstract_params, build, count_params, init_params, scale_post_norms

__all__ = [
    "CheckpointError", "GemmaConfig", "GenerateOutput", "SigLIPConfig", "Tokenizer",
    "VLM", "VLMConfig", "abstract_params", "build", "count_params", "detect_format",
    "get_preset", "init_params", "load", "scale_post_norms",
]
