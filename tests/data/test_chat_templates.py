"""Chat templates shaped like the ones real checkpoints ship: typed content parts, images
rendered first, `{% generation %}` blocks; and templates that cannot be trained on."""

import copy

import numpy as np
import pytest

from openvlm_jax.console import UserError
from openvlm_jax.data import conversation, pipeline

# Shaped like llava-hf/llava-1.5-7b-hf's: images of a turn first, then its text parts; the
# assistant's text inside {% generation %}; no end-of-turn token.
LLAVA_HF = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

# Shaped like Qwen2-VL's: ChatML, parts in their order, the image between vision markers,
# string content accepted too; no generation blocks.
QWEN2_VL = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><image><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Shaped like Idefics3 / SmolVLM's: typed parts only, each turn ends with <end_of_utterance>.
IDEFICS3 = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

TURNS = [
    {'from': 'human', 'value': '<image>\nWhat number is shown?'},
    {'from': 'gpt', 'value': 'The answer is 7.'},
    {'from': 'human', 'value': 'And the sum of these digits? 12'},
    {'from': 'gpt', 'value': '3'},
]
NUM_IMAGE_TOKENS = 3


def _with_template(tokenizer, template):
  copied = copy.deepcopy(tokenizer)
  copied.chat_template = template
  return copied


def _masked_runs(tokenizer, tokens):
  """Decodes each run of consecutive masked tokens."""
  ids, mask = tokens['input_ids'], tokens['loss_mask']
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  return [tokenizer.decode(ids[start:end]) for start, end in zip(edges[::2], edges[1::2])]


@pytest.mark.parametrize('template, typed, generation', [
    (LLAVA_HF, True, True), (QWEN2_VL, False, False), (IDEFICS3, True, False)])
def test_the_content_convention_is_found_by_rendering(tokenizer, template, typed, generation):
  style = conversation.template_style(_with_template(tokenizer, template))
  assert (style.typed_content, style.generation_blocks) == (typed, generation)


@pytest.mark.parametrize('template, replies', [
    (LLAVA_HF, [' The answer is 7. ', ' 3 ']),  # the {% generation %} blocks (leading "Ġ")
    (QWEN2_VL, ['The answer is 7.<|im_end|>', '3<|im_end|>']),
    (IDEFICS3, [' The answer is 7.<end_of_utterance>', ' 3<end_of_utterance>']),
])
def test_the_loss_mask_is_exactly_the_assistant_replies(tokenizer, template, replies):
  templated = _with_template(tokenizer, template)
  tokens = conversation.encode_conversation(
      TURNS, tokenizer=templated, num_images=1, num_image_tokens=NUM_IMAGE_TOKENS)
  assert _masked_runs(templated, tokens) == replies
  image_id = templated.convert_tokens_to_ids('<image>')
  assert (tokens['input_ids'] == image_id).sum() == NUM_IMAGE_TOKENS
  assert not tokens['loss_mask'][tokens['input_ids'] == image_id].any()
  # The question text is rendered (a string given to a typed template would vanish).
  assert 'What number is shown?' in templated.decode(tokens['input_ids'])


def test_typed_parts_put_each_image_where_its_placeholder_was():
  messages = conversation.to_messages(
      [{'from': 'human', 'value': 'Left <image> right <image>\nWhich is larger?'},
       {'from': 'gpt', 'value': 'Left.'}],
      num_images=2, image_token='<image>', typed_content=True)
  assert messages[0]['content'] == [
      {'type': 'text', 'text': 'Left '}, {'type': 'image'}, {'type': 'text', 'text': ' right '},
      {'type': 'image'}, {'type': 'text', 'text': 'Which is larger?'}]
  assert messages[1]['content'] == [{'type': 'text', 'text': 'Left.'}]


def test_the_prompt_of_a_typed_template_ends_where_the_reply_starts(tokenizer):
  templated = _with_template(tokenizer, LLAVA_HF)
  prompt, reference = conversation.encode_prompt(
      TURNS[:2], tokenizer=templated, num_images=1, num_image_tokens=NUM_IMAGE_TOKENS)
  tokens = conversation.encode_conversation(
      TURNS[:2], tokenizer=templated, num_images=1, num_image_tokens=NUM_IMAGE_TOKENS)
  assert reference == 'The answer is 7.'
  first_target = int(np.flatnonzero(tokens['loss_mask'])[0])
  np.testing.assert_array_equal(prompt, tokens['input_ids'][:first_target])


def test_a_template_that_writes_no_content_is_refused(tokenizer):
  roles_only = _with_template(
      tokenizer, "{% for message in messages %}{{ message['role'] }}\n{% endfor %}")
  with pytest.raises(UserError, match='neither from string content nor from typed'):
    conversation.encode_conversation(TURNS, tokenizer=roles_only, num_images=1,
                                     num_image_tokens=NUM_IMAGE_TOKENS)


# Numbers the turns up front (so conversation prefixes do not render as text prefixes and
# only the generation blocks can say where replies are) and marks the wrong role's text.
EMPTY_GENERATION = (
    "{{ messages | length }} turns\n{% for message in messages %}{{ message['role'] }}: "
    "{% if message['role'] == 'system' %}{% generation %}{{ message['content'] }}"
    "{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}")


def test_an_empty_loss_mask_is_a_bad_record(tokenizer):
  templated = _with_template(tokenizer, EMPTY_GENERATION)
  with pytest.raises(ValueError, match='the loss mask is empty'):
    conversation.encode_conversation(TURNS, tokenizer=templated, num_images=1,
                                     num_image_tokens=NUM_IMAGE_TOKENS)


def test_a_run_whose_records_all_fail_alike_stops_with_the_template_problem(
    tmp_path, tokenizer, make_record, make_jsonl):
  path = make_jsonl(str(tmp_path / 'train.jsonl'),
                    [make_record(i) for i in range(pipeline.EARLY_STOP_RECORDS + 8)])
  spec = pipeline.examples_lib.ExampleSpec(
      tokenizer=_with_template(tokenizer, EMPTY_GENERATION), image_size=8,
      image_mean=(0.5,) * 3, image_std=(0.25,) * 3, num_image_tokens=2, seq_len=32,
      max_images=1)
  bad_records = pipeline.BadRecords()
  with pytest.raises(UserError, match=r'first 32 records are all bad .*loss mask is empty.*'
                                      r'chat template of'):
    pipeline.load_records([path], spec, on_bad_record='skip', bad_records=bad_records)
  assert bad_records.total == pipeline.EARLY_STOP_RECORDS  # the rest was not read
