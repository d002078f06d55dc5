"""Tests of conversation rendering, image placeholder expansion and the assistant loss mask."""

import copy

import numpy as np
import pytest

from openvlm_jax.data import conversation

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _masked_text(tokenizer, tokens):
  """Decodes each run of masked tokens separately."""
  ids, mask = tokens['input_ids'], tokens['loss_mask']
  runs, current = [], []
  for token_id, keep in zip(ids, mask):
    if keep:
      current.append(int(token_id))
    elif current:
      runs.append(tokenizer.decode(current))
      current = []
  if current:
    runs.append(tokenizer.decode(current))
  return runs


def test_mask_covers_exactly_the_assistant_replies(tokenizer):
  turns = [
      {'from': 'system', 'value': 'Be brief.'},
      {'from': 'human', 'value': 'What number is shown? 12'},
      {'from': 'gpt', 'value': 'The answer is 7.'},
      {'from': 'human', 'value': 'And now?'},
      {'from': 'gpt', 'value': '42'},
  ]
  tokens = conversation.encode_conversation(
      turns, tokenizer=tokenizer, num_images=0, num_image_tokens=4)
  assert tokens['input_ids'].dtype == np.int32 and tokens['loss_mask'].dtype == np.int32
  assert tokens['input_ids'].shape == tokens['loss_mask'].shape
  assert _masked_text(tokenizer, tokens) == ['The answer is 7.</s>', '42</s>']
  unmasked = tokenizer.decode(tokens['input_ids'][tokens['loss_mask'] == 0])
  assert unmasked == ('<s>system:\nBe brief.\nuser:\nWhat number is shown? 12\nassistant:\n\n'
                      'user:\nAnd now?\nassistant:\n\n')


def test_mask_works_for_another_template(tokenizer):
  chatml = copy.deepcopy(tokenizer)
  chatml.chat_template = CHATML_TEMPLATE
  turns = [{'from': 'user', 'value': 'Hi 3'}, {'from': 'assistant', 'value': 'Hello 45'}]
  tokens = conversation.encode_conversation(
      turns, tokenizer=chatml, num_images=0, num_image_tokens=4)
  assert _masked_text(chatml, tokens) == ['Hello 45<|im_end|>']


def test_image_placeholders_are_expanded(tokenizer):
  image_token_id = tokenizer.convert_tokens_to_ids('<image>')
  turns = [
      {'from': 'human', 'value': '<image>\nCompare with <image>'},
      {'from': 'gpt', 'value': 'Same.'},
  ]
  tokens = conversation.encode_conversation(
      turns, tokenizer=tokenizer, num_images=2, num_image_tokens=5)
  assert (tokens['input_ids'] == image_token_id).sum() == 10
  assert tokens['loss_mask'][tokens['input_ids'] == image_token_id].sum() == 0


def test_missing_placeholder_is_prepended_to_first_user_turn(tokenizer):
  turns = [{'from': 'human', 'value': 'What is it?'}, {'from': 'gpt', 'value': 'A 3.'}]
  messages = conversation.to_messages(turns, num_images=1, image_token='<im>')
  assert messages[0]['content'] == '<im>\nWhat is it?'
  assert turns[0]['value'] == 'What is it?'  # the record is not modified


@pytest.mark.parametrize('turns, num_images, reason', [
    ([], 0, 'empty conversation'),
    ([{'from': 'human', 'value': 'Hi'}], 0, 'no assistant turn'),
    ([{'from': 'human', 'value': '<image><image>'}, {'from': 'gpt', 'value': '1'}], 1,
     r'2 <image> placeholder\(s\) in the text but 1 image'),
    ([{'from': 'human', 'value': '<image>'}, {'from': 'gpt', 'value': '1'}], 0,
     r'1 <image> placeholder\(s\) in the text but 0 image'),
    ([{'from': 'robot', 'value': 'x'}], 0, 'unknown role'),
    ([{'from': 'human'}], 0, '"from" and "value"'),
    ([{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': ''}], 0,
     'turn 1 is an empty assistant answer'),
    ([{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': ' \n '}], 0,
     'turn 1 is an empty assistant answer'),
])
def test_bad_conversations_raise(tokenizer, turns, num_images, reason):
  with pytest.raises(ValueError, match=reason):
    conversation.encode_conversation(
        turns, tokenizer=tokenizer, num_images=num_images, num_image_tokens=2)


def test_token_straddling_the_reply_start_is_a_target(tokenizer):
  spaced = copy.deepcopy(tokenizer)
  spaced.chat_template = (
      "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}|"
      "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
  turns = [{'from': 'user', 'value': 'Hi'}, {'from': 'assistant', 'value': 'The end'}]
  tokens = conversation.encode_conversation(
      turns, tokenizer=spaced, num_images=0, num_image_tokens=1)
  # "ĠThe" starts at the template's space but carries the reply's first word.
  assert _masked_text(spaced, tokens) == [' The end|']


def test_prompt_is_every_turn_before_the_last_answer(tokenizer):
  turns = [{'from': 'human', 'value': 'What is 2+2?'}, {'from': 'gpt', 'value': '4'},
           {'from': 'human', 'value': 'And 3+3?'}, {'from': 'gpt', 'value': ' 6 '}]
  prompt, reference = conversation.encode_prompt(turns, tokenizer=tokenizer, num_images=0,
                                                 num_image_tokens=2)
  assert reference == '6'
  tokens = conversation.encode_conversation(turns, tokenizer=tokenizer, num_images=0,
                                            num_image_tokens=2)
  # The prompt is the full conversation's tokens up to the last answer's first token.
  last_answer_start = np.flatnonzero(np.diff(tokens['loss_mask']) == 1)[-1] + 1
  np.testing.assert_array_equal(prompt, tokens['input_ids'][:last_answer_start])
  question_only, none = conversation.encode_prompt(turns[:1], tokenizer=tokenizer, num_images=0,
                                                   num_image_tokens=2)
  assert none is None and len(question_only) < len(prompt)
  with pytest.raises(ValueError, match='no question'):
    conversation.encode_prompt([{'from': 'gpt', 'value': '4'}], tokenizer=tokenizer,
                               num_images=0, num_image_tokens=2)
