"""Tests of the digit-splitting byte-level BPE tokenizer and its saved form."""

import transformers

from openvlm_jax.data import tokenizer as tokenizer_lib


def _tokens(tokenizer, text):
  return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)['input_ids'])


def test_every_digit_is_its_own_token(tokenizer):
  assert _tokens(tokenizer, '47') == ['4', '7']
  # A space before a number is a separate token, so "4" is the same token everywhere.
  assert _tokens(tokenizer, ' 47') == ['Ġ', '4', '7']
  assert _tokens(tokenizer, 'x12345')[-5:] == ['1', '2', '3', '4', '5']
  digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
  for text in ['The answer is 7.', 'sum 908', '(3)']:
    ids = tokenizer(text, add_special_tokens=False)['input_ids']
    digits_in_text = [c for c in text if c.isdigit()]
    assert [i for i in ids if i in digit_ids] == [digit_ids[int(c)] for c in digits_in_text]


def test_round_trip_decode(tokenizer):
  for text in ['What number is shown? 47', 'Ünïcode 😀 text\n\twith  spaces', '']:
    ids = tokenizer(text, add_special_tokens=False)['input_ids']
    assert tokenizer.decode(ids) == text


def test_reload_keeps_template_and_special_tokens(tokenizer, tmp_path):
  tokenizer.save_pretrained(str(tmp_path))
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  assert reloaded.chat_template == tokenizer_lib.CHAT_TEMPLATE
  assert (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token) == ('<pad>', '<s>', '</s>')
  assert [reloaded.convert_tokens_to_ids(t) for t in tokenizer_lib.SPECIAL_TOKENS] == [0, 1, 2, 3]
  assert tokenizer_lib.image_token_of(reloaded) == '<image>'
  text = reloaded.apply_chat_template(
      [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': '5'}], tokenize=False)
  assert text == '<s>user:\nHi\nassistant:\n5</s>\n'
  # Special tokens are single tokens inside text.
  ids = reloaded('a<image><image>b</s>', add_special_tokens=False)['input_ids']
  assert ids.count(3) == 2 and ids[-1] == 2
