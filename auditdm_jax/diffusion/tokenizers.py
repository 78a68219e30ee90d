"""FLUX's two prompt tokenizers, giving the ids transformers gives.

`T5Tokenizer` (FLUX's `tokenizer_2/`): the `sentencepiece` package on
spiece.model. A prompt is split on the added special tokens first (<pad>,
</s>, <unk> and the sentinels <extra_id_0..N-1>, numbered downward from the
top: <extra_id_0> = pieces + N - 1), each remaining piece of text is encoded
by sentencepiece (nmt_nfkc normalisation, whitespace folding, "▁" prefix;
every Unicode White_Space character left after normalisation counting as a
space, as transformers' whitespace pre-tokeniser has it);
then, as `T5TokenizerFast(texts, padding="max_length", max_length=M,
truncation=True)`: at most M-1 ids, </s>, <pad> up to M. (A directory with
only a tokenizer.json, as transformers 5 saves it, is read with the
`tokenizers` library in transformers' T5 pipeline instead.)

`ClipTokenizer` (FLUX's `tokenizer/`): the HF `tokenizers` library with
CLIP's pipeline, as transformers' CLIPTokenizer builds it: a BPE model on
vocab.json + merges.txt (or the vocabulary and merges inside tokenizer.json)
with the "</w>" end-of-word suffix; NFC, whitespace runs -> " ", lowercase;
split on CLIP's regex ('s 't 're 've 'm 'll 'd, letter runs, single digits,
runs of other non-space characters) then byte-level symbols; the special
tokens of tokenizer_config.json as added tokens; <|startoftext|> ... 
<|endoftext|> around each text; then at most M-2 text ids and padding with
the directory's pad token (<|endoftext|> in FLUX) up to M (77).

Both take a batch of texts and return int32 [B, M]. An empty or non-string
text is a ValueError naming its index; a text longer than M is truncated, as
transformers does (and diffusers warns; we log a warning).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["T5Tokenizer", "ClipTokenizer"]

log = logging.getLogger(__name__)

CLIP_POSITIONS = 77
# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer, as transformers uses it).
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
               r"""[\p{N}]|[^\s\p{L}\p{N}]+""")


# Unicode White_Space (Rust's char::is_whitespace, where transformers' T5
# pre-tokeniser splits words); sentencepiece itself folds only " ".
_WHITESPACE = {c: " " for c in (list(range(0x09, 0x0E)) + [0x85, 0xA0, 0x1680]
                                + list(range(0x2000, 0x200B)) + [0x2028, 0x2029, 0x202F,
                                                                 0x205F, 0x3000])}


def _texts(texts: Any, who: str) -> list[str]:
  if isinstance(texts, str):
    texts = [texts]
  if not isinstance(texts, Sequence) or not len(texts):
    raise ValueError(f"{who} expects a non-empty sequence of strings, got {type(texts).__name__}")
  out = []
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise ValueError(f"{who}: text {i} is a {type(t).__name__}, not a str")
    if not t:
      raise ValueError(f"{who}: text {i} is empty")
    out.append(t)
  return out


def _max_length(max_length: Any, least: int, who: str) -> int:
  if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) \
      or max_length < least:
    raise ValueError(f"{who}: max_length must be an int >= {least}, got {max_length!r}")
  return int(max_length)


def _read_json_opt(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"tokenizer file {path}: unreadable JSON: {e}") from e
  if not isinstance(out, dict):
    raise ValueError(f"tokenizer file {path}: not a JSON object")
  return out


def _content(tok: Any) -> str | None:
  if isinstance(tok, dict):
    return tok.get("content")
  return tok if isinstance(tok, str) else None


def _warn_truncated(who: str, index: int, n: int, max_length: int) -> None:
  log.warning("%s: text %d has %d tokens and was truncated to max_length %d", who, index, n,
              max_length)


# --------------------------------------------------------------------------- T5
def _hf_style_normalizer(sp):
  """(tokenizers' Precompiled normaliser of the model's charsmap, a copy of
  the sentencepiece model that normalises nothing but still folds spaces and
  adds the "▁" prefix), or (None, None) when the model has no charsmap or the
  protobuf module is missing; then sentencepiece normalises (it differs from
  transformers only on combining marks after characters NFKC rewrites)."""
  try:
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
    from tokenizers import normalizers  # pylint: disable=import-outside-toplevel
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
  except Exception:  # pylint: disable=broad-except
    return None, None
  charsmap = bytes(proto.normalizer_spec.precompiled_charsmap)
  if not charsmap:
    return None, None
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  proto.normalizer_spec.name = "identity"
  proto.normalizer_spec.precompiled_charsmap = b""
  proto.normalizer_spec.add_dummy_prefix = True
  proto.normalizer_spec.remove_extra_whitespaces = True
  words = spm.SentencePieceProcessor()
  words.LoadFromSerializedProto(proto.SerializeToString())
  return normalizers.Precompiled(charsmap), words


class T5Tokenizer:
  """T5's sentencepiece tokenizer with transformers' special-token handling.

  `path`: a tokenizer_2/ directory or its spiece.model. A directory without
  spiece.model but with a tokenizer.json (what transformers 5's
  save_pretrained writes) is read with the `tokenizers` library instead: its
  unigram vocabulary and normalisation map in transformers' T5 pipeline.
  """

  def __init__(self, path: str):
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
      model, folder = os.path.join(path, "spiece.model"), path
    else:
      model, folder = path, os.path.dirname(path)
    config = _read_json_opt(os.path.join(folder, "tokenizer_config.json"))
    names = {name: _content(config.get(name, default)) or default
             for name, default in (("pad_token", "<pad>"), ("eos_token", "</s>"),
                                   ("unk_token", "<unk>"))}
    extra = config.get("extra_ids", 100)
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
      raise ValueError(f"T5 tokenizer {folder}: extra_ids must be an int >= 0, got {extra!r}")
    declared = {}
    for key, tok in (config.get("added_tokens_decoder") or {}).items():
      if _content(tok) is not None:
        declared[_content(tok)] = int(key)
    tj = os.path.join(folder, "tokenizer.json")
    self.sp = None
    if os.path.isfile(model):
      self._init_sentencepiece(model, names, extra, declared)
    elif os.path.isdir(path) and os.path.isfile(tj):
      self._init_tokenizer_json(tj, names, extra, declared)
    else:
      raise ValueError(f"T5 tokenizer: no sentencepiece model {model}"
                       + (" (nor tokenizer.json)" if os.path.isdir(path) else ""))
    self.pad_id, self.eos_id, self.unk_id = (self.specials[names[k]] for k in
                                             ("pad_token", "eos_token", "unk_token"))
    mml = config.get("model_max_length", 512)
    self.model_max_length = int(mml) if isinstance(mml, (int, float)) and mml >= 1 else 512

  def _init_sentencepiece(self, model: str, names: dict, extra: int, declared: dict) -> None:
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.Load(model)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"T5 tokenizer: {model} is not a sentencepiece model ({e})") from e
    self.path = model
    self._normalizer, self._words_sp = _hf_style_normalizer(self.sp)
    pieces = self.sp.GetPieceSize()
    specials: dict[str, int] = {}
    for name, tok in names.items():
      i = self.sp.PieceToId(tok)
      if self.sp.IdToPiece(i) != tok:
        raise ValueError(f"T5 tokenizer {model}: {name} {tok!r} is not a piece of the model")
      specials[tok] = i
    for k in range(extra):
      specials[f"<extra_id_{k}>"] = pieces + extra - 1 - k
    for content, i in declared.items():
      specials.setdefault(content, i)
    self.specials = specials
    self.vocab_size = max([pieces] + [i + 1 for i in specials.values()])
    # Leftmost-longest match of the special tokens, as tokenizers' added-token splitter.
    alts = sorted(specials, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(re.escape(a) for a in alts) + ")")

  def _init_tokenizer_json(self, tj: str, names: dict, extra: int, declared: dict) -> None:
    import base64  # pylint: disable=import-outside-toplevel
    from tokenizers import AddedToken, Tokenizer, normalizers, \
        pre_tokenizers  # pylint: disable=import-outside-toplevel
    from tokenizers.models import Unigram  # pylint: disable=import-outside-toplevel
    data = _read_json_opt(tj)
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "Unigram" or not isinstance(vocab, list) or not vocab:
      raise ValueError(f"T5 tokenizer {tj}: not a unigram tokenizer")
    tok = Tokenizer(Unigram([(str(p), float(sc)) for p, sc in vocab],
                            unk_id=int(model.get("unk_id", 2)),
                            byte_fallback=bool(model.get("byte_fallback", False))))
    norm = data.get("normalizer") or {}
    for n in (norm.get("normalizers") or [norm]):
      if n and n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
        tok.normalizer = normalizers.Precompiled(base64.b64decode(n["precompiled_charsmap"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    wanted = dict(declared)
    for a in data.get("added_tokens") or []:
      wanted.setdefault(a["content"], int(a["id"]))
    for content in list(names.values()) + [f"<extra_id_{k}>" for k in range(extra)]:
      wanted.setdefault(content, tok.token_to_id(content))
    tok.add_special_tokens([AddedToken(c, normalized=False, special=True) for c in
                            sorted(wanted, key=lambda c: -1 if wanted[c] is None else wanted[c])])
    specials = {}
    for content, want in wanted.items():
      got = tok.token_to_id(content)
      if want is not None and got != want:
        raise ValueError(f"T5 tokenizer {tj}: token {content!r} should have id {want} but the "
                         f"vocabulary gives it {got}")
      specials[content] = got
    self.path = tj
    self._tok = tok
    self.specials = specials
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Ids of one text, without </s>."""
    if self.sp is None:
      return self._tok.encode(text, add_special_tokens=False).ids
    ids: list[int] = []
    for part in self._split.split(text):
      if not part:
        continue
      if part in self.specials:
        ids.append(self.specials[part])
      elif self._normalizer is not None:
        # transformers' order: the model's precompiled normalisation map
        # (tokenizers' own implementation of it), split at white space, then
        # the unigram model on the words (sentencepiece, normalising nothing).
        words = self._normalizer.normalize_str(part).translate(_WHITESPACE)
        ids.extend(self._words_sp.EncodeAsIds(words))
      else:
        ids.extend(self.sp.EncodeAsIds(self.sp.Normalize(part).translate(_WHITESPACE)))
    return ids

  def __call__(self, texts: Sequence[str], max_length: int) -> np.ndarray:
    """int32 [B, max_length]: ids[:max_length-1] + </s>, then <pad>s."""
    texts = _texts(texts, "T5Tokenizer")
    m = _max_length(max_length, 1, "T5Tokenizer")
    out = np.full((len(texts), m), self.pad_id, np.int32)
    for b, t in enumerate(texts):
      ids = self.encode(t)
      if len(ids) + 1 > m:
        _warn_truncated("T5Tokenizer", b, len(ids) + 1, m)
        ids = ids[:m - 1]
      ids = ids + [self.eos_id]
      out[b, :len(ids)] = ids
    return out


# --------------------------------------------------------------------------- CLIP
class ClipTokenizer:
  """CLIP's BPE tokenizer, on the HF `tokenizers` library."""

  def __init__(self, path: str, max_positions: int | None = None):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, \
        pre_tokenizers, processors  # pylint: disable=import-outside-toplevel
    from tokenizers.models import BPE  # pylint: disable=import-outside-toplevel
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
      raise ValueError(f"CLIP tokenizer: {path} is not a directory")
    self.path = path
    config = _read_json_opt(os.path.join(path, "tokenizer_config.json"))
    special_map = _read_json_opt(os.path.join(path, "special_tokens_map.json"))
    vocab, merges = self._vocab_and_merges(path)

    def special(name, default):
      return _content(config.get(name)) or _content(special_map.get(name)) or default

    bos, eos = special("bos_token", "<|startoftext|>"), special("eos_token", "<|endoftext|>")
    unk, pad = special("unk_token", "<|endoftext|>"), special("pad_token", "<|endoftext|>")
    decoder = config.get("added_tokens_decoder") or {}
    added = {}
    for key, tok in decoder.items():
      content = _content(tok)
      if content is None:
        continue
      if content in vocab and vocab[content] != int(key):
        raise ValueError(f"CLIP tokenizer {path}: added token {content!r} has id {key} in "
                         f"tokenizer_config.json but {vocab[content]} in the vocabulary")
      flags = tok if isinstance(tok, dict) else {}
      added[content] = AddedToken(content, single_word=bool(flags.get("single_word", False)),
                                  lstrip=bool(flags.get("lstrip", False)),
                                  rstrip=bool(flags.get("rstrip", False)),
                                  normalized=bool(flags.get("normalized", True)),
                                  special=bool(flags.get("special", True)))
    for content in (bos, eos, unk, pad):
      if content not in vocab and content not in added:
        raise ValueError(f"CLIP tokenizer {path}: special token {content!r} is not in the "
                         f"vocabulary")
      added.setdefault(content, AddedToken(content, normalized=True, special=True))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(),
                                           normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    # Added tokens in id order (ids already fixed by the vocabulary).
    tok.add_special_tokens(sorted(added.values(), key=lambda a: vocab.get(a.content, 1 << 40)))
    for key, t in decoder.items():
      content = _content(t)
      if content is not None and tok.token_to_id(content) != int(key):
        raise ValueError(f"CLIP tokenizer {path}: added token {content!r} should have id {key} "
                         f"but the vocabulary gives it {tok.token_to_id(content)}")
    ids = {name: tok.token_to_id(t) for name, t in (("bos", bos), ("eos", eos), ("pad", pad))}
    for name, i in ids.items():
      if i is None:
        raise ValueError(f"CLIP tokenizer {path}: no id for the {name} token")
    tok.post_processor = processors.RobertaProcessing((eos, ids["eos"]), (bos, ids["bos"]),
                                                      trim_offsets=False, add_prefix_space=False)
    self._tok = tok
    self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if max_positions is None:
      model_cfg = _read_json_opt(os.path.join(os.path.dirname(path.rstrip("/")), "text_encoder",
                                              "config.json"))
      max_positions = int(model_cfg.get("max_position_embeddings", CLIP_POSITIONS))
    mml = config.get("model_max_length", max_positions)
    if isinstance(mml, bool) or not isinstance(mml, (int, float)) or mml < 2:
      mml = max_positions
    self.max_length = int(min(mml, max_positions))

  @staticmethod
  def _vocab_and_merges(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tj = os.path.join(path, "tokenizer.json")
    vj, mt = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isfile(tj) and not (os.path.isfile(vj) and os.path.isfile(mt)):
      model = _read_json_opt(tj).get("model") or {}
      if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"CLIP tokenizer {tj}: not a BPE tokenizer")
      merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                for m in model.get("merges") or []]
      return dict(model["vocab"]), merges
    if not os.path.isfile(vj):
      raise ValueError(f"CLIP tokenizer {path}: no vocab.json (nor tokenizer.json)")
    if not os.path.isfile(mt):
      raise ValueError(f"CLIP tokenizer {path}: no merges.txt")
    vocab = _read_json_opt(vj)
    if not vocab or not all(isinstance(v, int) for v in vocab.values()):
      raise ValueError(f"CLIP tokenizer {vj}: not a {{token: id}} vocabulary")
    merges = []
    with open(mt, encoding="utf-8") as f:
      for n, line in enumerate(f):
        line = line.rstrip("\n")
        if (n == 0 and line.startswith("#version")) or not line.strip():
          continue
        parts = line.split(" ")
        if len(parts) != 2:
          raise ValueError(f"CLIP tokenizer {mt}: line {n + 1} is not a merge 'a b': {line!r}")
        merges.append((parts[0], parts[1]))
    return vocab, merges

  def encode(self, text: str) -> list[int]:
    """Ids of one text with <|startoftext|> ... <|endoftext|>, untruncated."""
    return self._tok.encode(text).ids

  def __call__(self, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
    """int32 [B, max_length] (default self.max_length, 77)."""
    texts = _texts(texts, "ClipTokenizer")
    m = _max_length(self.max_length if max_length is None else max_length, 2, "ClipTokenizer")
    out = np.full((len(texts), m), self.pad_id, np.int32)
    for b, enc in enumerate(self._tok.encode_batch(texts)):
      ids = enc.ids
      if len(ids) > m:
        _warn_truncated("ClipTokenizer", b, len(ids), m)
        ids = ids[:m - 1] + [self.eos_id]
      out[b, :len(ids)] = ids
    return out
