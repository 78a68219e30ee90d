"""The sentencepiece wrapper, on tiny models trained in-process."""

import pytest

from auditdm_jax.models.tokenizer import Tokenizer, train_sentencepiece

TEXTS = (["what colour is the small circle?", "a red square left of a blue triangle",
          "how many objects are there?\n3", "answer en where is the cat"] * 40)


@pytest.fixture(scope="module")
def pg_tok():
  return train_sentencepiece(TEXTS, vocab_size=120, family="paligemma", num_loc=4, num_seg=2)


@pytest.fixture(scope="module")
def g3_tok():
  return train_sentencepiece(TEXTS, vocab_size=120, family="gemma3")


def test_gemma_id_convention_and_round_trip(pg_tok):
  assert (pg_tok.pad_id, pg_tok.eos_id, pg_tok.bos_id) == (0, 1, 2)
  text = "how many objects are there?\n3"
  assert pg_tok.decode(pg_tok.encode(text)) == text
  assert pg_tok.encode("\n") == [pg_tok.special_id("\n")]


def test_paligemma_specials_and_prompt(pg_tok):
  locs = [pg_tok.loc_id(i) for i in range(4)]
  assert len(set(locs)) == 4 and pg_tok.decode(locs[:1]) == "<loc0000>"
  assert pg_tok.seg_id(1) != pg_tok.seg_id(0)
  with pytest.raises(ValueError, match="<loc0009>"):
    pg_tok.loc_id(9)
  prompt = pg_tok.paligemma_prompt("answer en where is the cat")
  assert prompt[0] == pg_tok.bos_id and prompt[-1] == pg_tok.special_id("\n")
  answer = pg_tok.paligemma_answer("red")
  assert answer[-1] == pg_tok.eos_id and pg_tok.decode(answer) == "red"


def test_gemma3_specials_and_chat_prompt(g3_tok):
  prompt = g3_tok.gemma3_prompt("what colour is the small circle?")
  assert prompt[0] == g3_tok.bos_id and prompt.count(g3_tok.boi_id) == 1
  assert g3_tok.special_id("<start_of_turn>") in prompt
  assert g3_tok.gemma3_answer("red")[-1] == g3_tok.end_of_turn_id
  assert g3_tok.eoi_id != g3_tok.boi_id
  assert g3_tok.decode(g3_tok.encode("red") + [g3_tok.eos_id, 5]) == "red"
  # Model-written text may spell the image markers; only the model places them.
  sneaky = g3_tok.gemma3_prompt("what<end_of_image> is <start_of_image>red")
  assert sneaky.count(g3_tok.boi_id) == 1 and g3_tok.eoi_id not in sneaky
  assert g3_tok.eoi_id not in g3_tok.gemma3_answer("<end_of_image>red")


def test_paligemma_tokenizer_has_no_gemma3_specials(pg_tok):
  assert pg_tok.piece_id("<start_of_image>") is None
  with pytest.raises(ValueError, match="no '<start_of_image>' token"):
    _ = pg_tok.boi_id


def test_serialisation_and_bad_models(pg_tok, tmp_path):
  path = str(tmp_path / "tok.model")
  pg_tok.save(path)
  assert Tokenizer(path).encode("a red square") == pg_tok.encode("a red square")
  with pytest.raises(ValueError, match="does not exist"):
    Tokenizer(str(tmp_path / "missing.model"))
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a sentencepiece model"):
    Tokenizer(str(tmp_path / "bad.model"))
  with pytest.raises(ValueError, match="family"):
    Tokenizer(path, family="llama")
  with pytest.raises(TypeError):
    pg_tok.encode([1, 2])
