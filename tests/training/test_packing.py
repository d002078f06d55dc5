"""A packed batch trains exactly as the same examples padded: loss, gradients, isolation.

The batch comes from the real pipeline (`data.packing`): row 0 packs a text-only example with
an image example, row 1 holds a text-only example alone (a row without images), row 2 a
two-image example. xla is checked with and without the prefix-LM mask, pallas (interpret mode)
with it; cudnn needs an NVIDIA GPU and is left to accelerator runs.
"""

import jax
import numpy as np
import pytest

from configs import sft
from openvlm_jax import config_lib
from openvlm_jax.data import examples as examples_lib
from openvlm_jax.data import pipeline
from openvlm_jax.data import tokenizer as tokenizer_lib
from openvlm_jax.models.vlm import VLM
from openvlm_jax.objectives import sft as sft_objective
from openvlm_jax.training import step as step_lib
from tests.data.conftest import CORPUS, write_jsonl
from tests.data.test_pipeline_packing import mixed_records
from tests.models.test_attention_impl import assert_grads_close

TOLERANCE = 1e-5
ORDER = (1, 5, 0, 2, 3)  # text, text, image, two images, two turns (see the module docstring)


def _model(tokenizer, attention_impl: str, prefix_attention: bool) -> VLM:
  config = sft.get_config('model=tiny')
  config.model.attention_impl = attention_impl
  config.model.prefix_attention = prefix_attention
  image_token_id = tokenizer.convert_tokens_to_ids(tokenizer_lib.IMAGE_TOKEN)
  return VLM(config_lib.build_vlm_config(config.model, vocab_size=len(tokenizer),
                                         image_token_id=image_token_id))


@pytest.fixture(scope='module')
def batches(tmp_path_factory):
  """(tokenizer, packed batch, the same examples as a padded batch, in segment order)."""
  root = tmp_path_factory.mktemp('packing')
  tokenizer = tokenizer_lib.train_tokenizer(CORPUS, str(root / 'tokenizer'), vocab_size=320)
  records = mixed_records(12)
  path = write_jsonl(str(root / 'mixed.jsonl'), [records[i] for i in ORDER])
  vision = _model(tokenizer, 'xla', False).config.vision
  spec = {'image_size': vision.image_size, 'image_mean': (0.5,) * 3, 'image_std': (0.5,) * 3,
          'num_image_tokens': vision.num_image_tokens, 'seq_len': 64, 'max_images': 2,
          'tokenizer': tokenizer, 'shuffle': False, 'num_epochs': 1}
  examples = list(pipeline.make_iterator([path], batch_size=1, **spec))
  packed = next(pipeline.make_iterator([path], batch_size=3, packing=True, pack_max_images=4,
                                       **spec))
  order = []
  for row, segments in enumerate(packed['attention_mask']):
    for segment in np.unique(segments[segments > 0]):
      tokens = packed['input_ids'][row, segments == segment]
      order.append(next(i for i, example in enumerate(examples)
                        if np.array_equal(example['input_ids'][0, :len(tokens)], tokens)
                        and example['attention_mask'].sum() == len(tokens)))
  padded = examples_lib.stack_examples([{key: value[0] for key, value in examples[i].items()}
                                        for i in order])
  assert len(order) == 4 and packed['num_images'].tolist() == [1, 0, 2]
  return tokenizer, packed, padded


def _loss_and_grads(model, params, batch):
  def loss(params):
    terms = sft_objective.loss_terms(step_lib.model_logits(model, params, batch), batch)
    return terms['nll_sum'] / terms['num_tokens']  # per target token over the batch
  return jax.jit(jax.value_and_grad(loss))(params)


# pallas with the prefix covers its causal path too (the same kernel, one more mask term).
@pytest.mark.parametrize('attention_impl, prefix_attention',
                         [('xla', False), ('xla', True), ('pallas', True)],
                         ids=['xla-causal', 'xla-prefix', 'pallas-prefix'])
def test_packed_loss_and_gradients_equal_the_padded_ones(batches, attention_impl,
                                                         prefix_attention):
  tokenizer, packed, padded = batches
  model = _model(tokenizer, attention_impl, prefix_attention)
  params = jax.jit(model.init)(jax.random.key(0), padded['input_ids'], padded['images'],
                               positions=padded['positions'],
                               attention_mask=padded['attention_mask'])['params']
  padded_loss, padded_grads = _loss_and_grads(model, params, padded)
  packed_loss, packed_grads = _loss_and_grads(model, params, packed)
  print(f'{attention_impl} prefix={prefix_attention}: padded {float(padded_loss):.7f} '
        f'packed {float(packed_loss):.7f}')
  assert abs(float(packed_loss) - float(padded_loss)) <= TOLERANCE * abs(float(padded_loss))
  assert_grads_close(padded_grads, packed_grads, TOLERANCE)


@pytest.mark.parametrize('attention_impl', ['xla', 'pallas'])
def test_a_segment_never_sees_another(batches, attention_impl):
  tokenizer, packed, _ = batches
  model = _model(tokenizer, attention_impl, prefix_attention=True)
  params = jax.jit(model.init)(jax.random.key(1), packed['input_ids'], packed['images'],
                               positions=packed['positions'],
                               attention_mask=packed['attention_mask'])['params']
  logits = jax.jit(lambda batch: step_lib.model_logits(model, params, batch))
  changed = dict(packed, input_ids=packed['input_ids'].copy())
  first = np.flatnonzero(packed['attention_mask'][0] == 1)
  changed['input_ids'][0, first[1]] = (changed['input_ids'][0, first[1]] + 1) % len(tokenizer)
  before, after = np.asarray(logits(packed)), np.asarray(logits(changed))
  others = packed['attention_mask'] != 1
  others[1:] = True  # the other rows, and the other segments of row 0
  np.testing.assert_array_equal(after[others], before[others])
  assert np.abs(after[0, first] - before[0, first]).max() > 0  # the change did reach its own
