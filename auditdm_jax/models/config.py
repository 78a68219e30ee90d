"""VLMConfig: one vision-language model (PaliGemma 2 or Gemma 3) = SigLIP + Gemma.

Configs are frozen dataclasses; `to_dict` / `from_dict` round-trip them through
JSON (our own checkpoints store `config.json` next to the Orbax params).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from auditdm_jax.models.gemma import GemmaConfig
from auditdm_jax.models.siglip import SigLIPConfig

FAMILIES = ("paligemma", "gemma3")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """A PaliGemma-style (prefix-LM) or Gemma 3-style (interleaved) VLM.

  paligemma: the image tokens (SigLIP + linear head into the LLM width, not
    scaled by sqrt(width)) are followed by the text; attention is
    bidirectional over image + prompt (the prefix) and causal over the answer.
  gemma3: the prompt holds `boi_id` where the image goes; the model expands it
    to [image_wrap_id] boi [image_token_id] * mm_tokens_per_image eoi
    [image_wrap_id]; SigLIP features are 2D-average-pooled to
    mm_tokens_per_image soft tokens, RMS-normalised and projected; attention is
    causal with each image block bidirectional.
  """

  family: str
  vision: SigLIPConfig
  text: GemmaConfig
  variant: str = "custom"
  bos_id: int = 2
  eos_id: int = 1
  pad_id: int = 0
  # Gemma 3 image block.
  mm_tokens_per_image: int = 256
  boi_id: int | None = None
  eoi_id: int | None = None
  image_token_id: int | None = None
  image_wrap_id: int | None = None

  def __post_init__(self):
    problems = []
    if self.family not in FAMILIES:
      problems.append(f"family must be one of {FAMILIES}, got {self.family!r}")
    if self.family == "paligemma" and self.vision.out_dim != self.text.width:
      problems.append(f"paligemma: vision.out_dim ({self.vision.out_dim}) must "
                      f"equal text.width ({self.text.width})")
    if self.family == "gemma3":
      if self.vision.out_dim is not None:
        problems.append("gemma3: vision.out_dim must be None (the text embedder "
                        "projects the pooled features)")
      if self.text.vision_proj_dim != self.vision.width:
        problems.append(f"gemma3: text.vision_proj_dim ({self.text.vision_proj_dim})"
                        f" must equal vision.width ({self.vision.width})")
      for name in ("boi_id", "eoi_id", "image_token_id"):
        if getattr(self, name) is None:
          problems.append(f"gemma3: {name} must be set")
      side = int(round(self.mm_tokens_per_image ** 0.5))
      if side * side != self.mm_tokens_per_image:
        problems.append(f"mm_tokens_per_image {self.mm_tokens_per_image} is not a square")
      elif self.vision.grid % side:
        problems.append(f"vision grid {self.vision.grid} is not divisible by "
                        f"{side} tokens per side")
    if problems:
      raise ValueError("Invalid VLMConfig: " + "; ".join(problems))

  @property
  def num_image_tokens(self) -> int:
    """Positions one image occupies in the LLM sequence (without wrappers)."""
    if self.family == "paligemma":
      return self.vision.num_patches
    return self.mm_tokens_per_image

  def replace(self, **kw) -> "VLMConfig":
    return dataclasses.replace(self, **kw)

  def with_dtypes(self, dtype: str | None = None, param_dtype: str | None = None):
    kw = {}
    if dtype:
      kw["dtype"] = dtype
    if param_dtype:
      kw["param_dtype"] = param_dtype
    return self.replace(vision=dataclasses.replace(self.vision, **kw),
                        text=dataclasses.replace(self.text, **kw))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VLMConfig":
    if not isinstance(d, dict):
      raise ValueError(f"VLMConfig.from_dict needs a dict, got {type(d).__name__}")
    d = dict(d)
    try:
      vision = SigLIPConfig(**d.pop("vision"))
      text = GemmaConfig(**d.pop("text"))
      return cls(vision=vision, text=text, **d)
    except (KeyError, TypeError) as e:
      raise ValueError(f"malformed VLMConfig dict: {e}") from e
