"""Examples built from records: the prefix of a prefix LM (`prefix_len`)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from openvlm_jax.data import conversation
from openvlm_jax.data import examples as examples_lib

NUM_IMAGE_TOKENS = 2


def _spec(tokenizer) -> examples_lib.ExampleSpec:
  return examples_lib.ExampleSpec(tokenizer=tokenizer, image_size=8, image_mean=(0.5,) * 3,
                                  image_std=(0.25,) * 3, num_image_tokens=NUM_IMAGE_TOKENS,
                                  seq_len=96, max_images=2)


def _png(value: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


def _prompt_tokens(tokenizer, turns, num_images):
  """The turns before the first assistant reply, rendered with the generation prompt."""
  messages = conversation.to_messages(turns, num_images=num_images, image_token='<image>')
  first_reply = next(k for k, message in enumerate(messages) if message['role'] == 'assistant')
  for message in messages:  # LlavaProcessor's widening, done on the text
    message['content'] = message['content'].replace('<image>', '<image>' * NUM_IMAGE_TOKENS)
  text = tokenizer.apply_chat_template(messages[:first_reply], tokenize=False,
                                       add_generation_prompt=True)
  return tokenizer(text, add_special_tokens=False)['input_ids']


RECORDS = {
    'one_turn_one_image': (
        [{'from': 'human', 'value': '<image>\nWhat number is shown?'},
         {'from': 'gpt', 'value': 'The answer is 7.'}], 1),
    'multi_turn_system_no_image': (
        [{'from': 'system', 'value': 'Be brief.'},
         {'from': 'human', 'value': 'What is the sum of these digits? 12'},
         {'from': 'gpt', 'value': '3'},
         {'from': 'human', 'value': 'Describe the picture in one word.'},
         {'from': 'gpt', 'value': 'A square.'}], 0),
    'multi_turn_two_images': (
        [{'from': 'human', 'value': 'Which digit is this? <image> and <image>'},
         {'from': 'gpt', 'value': '0 1'},
         {'from': 'human', 'value': 'What number is shown?'},
         {'from': 'gpt', 'value': '4'}], 2),
}


@pytest.mark.parametrize('name', sorted(RECORDS))
def test_prefix_len_is_the_index_of_the_first_answer_token(tokenizer, name):
  turns, num_images = RECORDS[name]
  record = {'conversations': turns, 'image_bytes': [_png(40 * i) for i in range(num_images)]}
  example = examples_lib.make_example(record, _spec(tokenizer))
  prefix_len = int(example['prefix_len'])
  assert example['prefix_len'].dtype == np.int32 and example['prefix_len'].shape == ()
  # The prefix is exactly the prompt the first reply is conditioned on.
  prompt = _prompt_tokens(tokenizer, turns, num_images)
  assert prefix_len == len(prompt)
  np.testing.assert_array_equal(example['input_ids'][:prefix_len], prompt)
  assert tokenizer.decode(example['input_ids'][prefix_len - 1:prefix_len]) == '\n'
  # targets[t] is token t + 1: the first target with loss is the first answer token.
  assert np.flatnonzero(example['loss_mask'])[0] == prefix_len - 1
  image_token_id = tokenizer.convert_tokens_to_ids('<image>')
  image_positions = np.flatnonzero(example['input_ids'] == image_token_id)
  assert len(image_positions) == num_images * NUM_IMAGE_TOKENS
  assert (image_positions < prefix_len).all()


def test_single_turn_prefix_is_the_inference_prompt(tokenizer):
  turns, num_images = RECORDS['one_turn_one_image']
  record = {'conversations': turns, 'image_bytes': [_png(7)] * num_images}
  example = examples_lib.make_example(record, _spec(tokenizer))
  prompt, reference = examples_lib.encode_prompt(record, _spec(tokenizer))
  assert reference == turns[1]['value']
  np.testing.assert_array_equal(example['input_ids'][:int(example['prefix_len'])], prompt)


def test_empty_example_and_batches_carry_prefix_len(tokenizer):
  spec = _spec(tokenizer)
  records = [{'conversations': RECORDS[name][0],
              'image_bytes': [_png(9)] * RECORDS[name][1]} for name in sorted(RECORDS)]
  rows = [examples_lib.make_example(record, spec) for record in records]
  rows.append(examples_lib.empty_example(spec))
  batch = examples_lib.stack_examples(rows)
  assert batch['prefix_len'].dtype == np.int32 and batch['prefix_len'].shape == (4,)
  np.testing.assert_array_equal(batch['prefix_len'], [int(row['prefix_len']) for row in rows])
  assert batch['prefix_len'][-1] == 0


def test_preference_records_of_both_layouts_become_chosen_and_rejected_rows(tmp_path, tokenizer):
  from openvlm_jax.data import jsonl, pipeline  # pylint: disable=g-import-not-at-top
  question = '<image>\nWhat is the sum of these digits?'
  layouts = [{'image': 'a.png', 'prompt': question, 'chosen': '15', 'rejected': '13'},
             {'image': 'a.png', 'conversations': [{'from': 'human', 'value': question}],
              'chosen': '15', 'rejected': '13'}]
  (tmp_path / 'a.png').write_bytes(_png(40))
  spec = _spec(tokenizer)
  examples = []
  for line_no, layout in enumerate(layouts, start=1):
    record = jsonl.parse_record(json.dumps(layout), str(tmp_path / 'p.jsonl'), line_no)
    assert record['conversations'][-1] == {'from': 'gpt', 'value': '15'}
    assert record['rejected_conversations'][-1] == {'from': 'gpt', 'value': '13'}
    examples_lib.check_pair(record, spec)
    examples.append(examples_lib.make_pair_example(record, spec))
  for name in examples[0]:  # the two layouts give the same pair
    np.testing.assert_array_equal(examples[0][name], examples[1][name], err_msg=name)
  pair = examples[0]
  assert pair['input_ids'].shape == (2, 96) and pair['images'].shape == (2, 2, 8, 8, 3)
  np.testing.assert_array_equal(pair['images'][0], pair['images'][1])
  # Same prompt, then the answers: each row's loss mask covers its own answer.
  prefix = int(pair['prefix_len'][0])
  assert int(pair['prefix_len'][1]) == prefix
  np.testing.assert_array_equal(pair['input_ids'][0, :prefix], pair['input_ids'][1, :prefix])
  answers = [tokenizer.decode(row[mask > 0]) for row, mask in
             zip(pair['targets'], pair['loss_mask'])]
  assert answers[0].startswith('15') and answers[1].startswith('13')
  # Eval batches of pairs pad with empty pairs.
  batch = pipeline._eval_batch([pair], spec, batch_size=2, pairs=True)
  assert batch['input_ids'].shape == (2, 2, 96)
  np.testing.assert_array_equal(batch['example_mask'], [1.0, 0.0])


@pytest.mark.parametrize('record,reason', [
    ({'prompt': 'Sum?', 'chosen': '15'}, "needs 'rejected' as a string"),
    ({'chosen': '15', 'rejected': '13'}, "needs 'prompt' or 'conversations'"),
    ({'prompt': 'Sum?', 'chosen': 15, 'rejected': '13'}, "needs 'chosen' as a string"),
])
def test_bad_preference_records_name_the_line(tmp_path, record, reason):
  from openvlm_jax.data import jsonl  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=f'p.jsonl:3: a preference record {reason}'):
    jsonl.parse_record(json.dumps(record), str(tmp_path / 'p.jsonl'), 3)


def test_a_conversation_is_not_a_pair(tokenizer):
  record = {'where': 'x:1', 'conversations': [{'from': 'human', 'value': 'Hi?'},
                                              {'from': 'gpt', 'value': 'Hello.'}]}
  with pytest.raises(ValueError, match="not a preference record: it needs 'chosen' and"):
    examples_lib.check_pair(record, _spec(tokenizer))
