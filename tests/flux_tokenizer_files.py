"""Tiny but real tokenizer directories for FLUX's two text encoders, written
without downloading anything, in the layout of a diffusers FLUX pipeline:

  tokenizer/    (CLIP BPE)  vocab.json, merges.txt, tokenizer_config.json,
                            special_tokens_map.json
  tokenizer_2/  (T5)        spiece.model, tokenizer_config.json,
                            special_tokens_map.json

`transformers.CLIPTokenizer.from_pretrained(dir)` and
`transformers.T5TokenizerFast.from_pretrained(dir)` load them (so diffusers'
`FluxPipeline.from_pretrained` accepts them as `tokenizer/` / `tokenizer_2/`),
and each writer returns the number of ids its tokenizer can produce, the
smallest `vocab_size` a text encoder paired with it may have.

CLIP vocabulary order follows openai/clip-vit-large-patch14: the 256
byte-level symbols, the same 256 with "</w>", one entry per merge, then
<|startoftext|> and <|endoftext|> as the two highest ids (so CLIP's legacy
"argmax of the ids" pooling rule finds the end token).

T5: a sentencepiece unigram model trained in-process with T5's settings
(nmt_nfkc normalisation, dummy prefix, whitespace folding; pad 0, eos 1,
unk 2, no bos) plus T5's 100 sentinel tokens <extra_id_99> .. <extra_id_0>
appended after the pieces, as transformers numbers them.
"""

from __future__ import annotations

import io
import json
import os

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
T5_EXTRA_IDS = 100

_MERGES = [
    "t h", "th e</w>", "a n", "an d</w>", "i n", "in g</w>", "o n</w>", "e r", "o f</w>",
    "c a", "ca t</w>", "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>", "r e",
    "a t</w>", "i s</w>", "t o</w>", "h e", "l l", "he ll", "hell o</w>", "w o", "r l",
    "wo rl", "worl d</w>", "i t</w>", "e d</w>", "o u", "a r", "e n", "s t", "r e</w>",
    "e r</w>", "o r</w>", "th e", "the r</w>", "c o", "co l", "col o", "colo r</w>",
    "re d</w>", "b l", "bl u", "blu e</w>", "s q", "sq u", "squ a", "squa re</w>", "o w",
    "ow n</w>", "s t</w>", "i n</w>",
]


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2 / CLIP's reversible byte -> printable character table."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  order = keep + [b for b in range(256) if b not in keep]
  return {b: out[b] for b in order}


def _added(content: str, normalized: bool) -> dict:
  return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
          "single_word": False, "special": True}


def write_clip_tokenizer(path) -> int:
  """Writes a CLIP BPE tokenizer directory; returns its vocabulary size."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  symbols = list(_bytes_to_unicode().values())
  vocab: dict[str, int] = {}
  for s in symbols + [s + "</w>" for s in symbols]:
    vocab[s] = len(vocab)
  merges = []
  for m in _MERGES:
    a, b = m.split(" ")
    if m in merges:
      continue
    assert a in vocab and b in vocab, f"merge {m!r} joins pieces not in the vocabulary"
    merges.append(m)
    vocab.setdefault(a + b, len(vocab))
  bos, eos = "<|startoftext|>", "<|endoftext|>"
  vocab[bos] = len(vocab)
  vocab[eos] = len(vocab)
  with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  config = {
      "add_prefix_space": False,
      "added_tokens_decoder": {str(vocab[bos]): _added(bos, True),
                               str(vocab[eos]): _added(eos, True)},
      "bos_token": bos, "clean_up_tokenization_spaces": True, "do_lower_case": True,
      "eos_token": eos, "errors": "replace", "model_max_length": CLIP_MAX_LENGTH,
      "pad_token": eos, "tokenizer_class": "CLIPTokenizer", "unk_token": eos,
  }
  specials = {"bos_token": _added(bos, True), "eos_token": _added(eos, True),
              "pad_token": _added(eos, True), "unk_token": _added(eos, True)}
  for k in specials.values():
    k.pop("special")
  with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(specials, f, indent=2)
  return len(vocab)


_SUBJECTS = ["a cat", "the dog", "a small red square", "two blue circles", "an old man",
             "a young woman", "the city at night", "a bowl of fruit", "a mountain lake",
             "three green birds", "a photo of a house", "the painting", "a robot",
             "a wooden table", "an astronaut", "the river", "a yellow car", "a bicycle"]
_VERBS = ["sits on", "stands next to", "looks at", "is painted in front of", "jumps over",
          "is lit by", "rests under", "floats above", "walks towards", "holds"]
_OBJECTS = ["the window", "a tall tree", "the sunset", "a colourful wall", "the ocean",
            "soft morning light", "a glass of water", "the moon", "a busy street",
            "a field of flowers", "the old bridge", "a stack of books"]
_STYLES = ["", ", highly detailed", ", in the style of an oil painting", ", 4k photograph",
           ", cinematic lighting", ", watercolour", ", digital art, trending", ", 35mm film."]


def t5_training_sentences(n: int = 400) -> list[str]:
  """A few hundred varied English prompt-like sentences (deterministic)."""
  out = []
  for i in range(n):
    s = (f"{_SUBJECTS[i % len(_SUBJECTS)]} {_VERBS[(i * 7) % len(_VERBS)]} "
         f"{_OBJECTS[(i * 5) % len(_OBJECTS)]}{_STYLES[(i * 3) % len(_STYLES)]}")
    if i % 4 == 0:
      s = s[0].upper() + s[1:]
    if i % 9 == 0:
      s += f" Number {i}, size {i % 13}x{(i * 3) % 17}!"
    if i % 11 == 0:
      s += " Is it (really) 'beautiful'? Yes: quite; \"very\" - so."
    out.append(s)
  return out


def write_t5_tokenizer(path, pieces: int = 160) -> int:
  """Trains and writes a T5 sentencepiece tokenizer directory; returns the
  number of ids it produces (`pieces` + T5's 100 sentinel tokens)."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  model = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(t5_training_sentences()), model_writer=model,
      vocab_size=pieces, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      normalization_rule_name="nmt_nfkc", add_dummy_prefix=True,
      remove_extra_whitespaces=True, character_coverage=1.0, hard_vocab_limit=True,
      minloglevel=2)
  proto = model.getvalue()
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(proto)
  n = sp.GetPieceSize()
  assert n == pieces, (n, pieces)
  with open(os.path.join(path, "spiece.model"), "wb") as f:
    f.write(proto)
  extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
  decoder = {"0": _added("<pad>", False), "1": _added("</s>", False),
             "2": _added("<unk>", False)}
  for i in range(T5_EXTRA_IDS):
    decoder[str(n + T5_EXTRA_IDS - 1 - i)] = _added(f"<extra_id_{i}>", False)
  config = {
      "add_prefix_space": None, "added_tokens_decoder": decoder,
      "additional_special_tokens": extra, "clean_up_tokenization_spaces": True,
      "eos_token": "</s>", "extra_ids": T5_EXTRA_IDS, "legacy": True,
      "model_max_length": T5_MAX_LENGTH, "pad_token": "<pad>", "sp_model_kwargs": {},
      "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>",
  }
  specials = {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>"}
  with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(specials, f, indent=2)
  return n + T5_EXTRA_IDS
