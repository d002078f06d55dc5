"""LLaVA conversations -> token ids and an assistant-only loss mask, for any chat template.

The assistant replies are located by rendering prefixes of the conversation: the text that
`messages[:k+1]` adds to `messages[:k]` + generation prompt is exactly the k-th reply as the
template writes it (content and end-of-turn token). Tokens whose character offsets start
inside those spans are the training targets. This needs no knowledge of the template.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from openvlm_jax.data import tokenizer as tokenizer_lib

# The placeholder LLaVA data uses in the text, whatever the tokenizer's image token is.
IMAGE_PLACEHOLDER = '<image>'

ROLES = {
    'human': 'user',
    'user': 'user',
    'gpt': 'assistant',
    'assistant': 'assistant',
    'system': 'system',
}


def to_messages(
    conversations: Sequence[dict[str, Any]],
    *,
    num_images: int,
    image_token: str,
    num_image_tokens: int,
    require_answer: bool = True,
) -> list[dict[str, str]]:
  """Turns LLaVA turns into chat messages with each image placeholder expanded.

  Args:
    conversations: `[{"from": "human"|"gpt"|"user"|"assistant"|"system", "value": str}]`.
    num_images: images attached to the record. If there are images but no `<image>` in the
      text, one placeholder per image is prepended to the first user turn, as LLaVA does.
    image_token: the tokenizer's image token; each placeholder becomes `num_image_tokens`
      copies of it, as Hugging Face's LlavaProcessor does.
    num_image_tokens: sequence positions one image occupies.
    require_answer: a conversation without an assistant turn is an error (training); False
      for a question to be answered.

  Returns:
    `[{"role": "user"|"assistant"|"system", "content": str}]`.

  Raises:
    ValueError: an empty conversation, a malformed turn, an unknown role, an empty assistant
      answer, no assistant turn (with `require_answer`), or a placeholder count that differs
      from `num_images`.
  """
  if not isinstance(conversations, (list, tuple)) or not conversations:
    raise ValueError('empty conversation')
  messages = []
  for turn_index, turn in enumerate(conversations):
    if not isinstance(turn, dict) or 'from' not in turn or 'value' not in turn:
      raise ValueError(f'turn {turn_index} needs "from" and "value"')
    role = ROLES.get(turn['from'])
    if role is None:
      raise ValueError(f'turn {turn_index} has unknown role {turn["from"]!r}')
    if not isinstance(turn['value'], str):
      raise ValueError(f'turn {turn_index} "value" is not a string')  # noqa: TRY004 (bad data)
    if role == 'assistant' and not turn['value'].strip():
      raise ValueError(f'turn {turn_index} is an empty assistant answer')
    messages.append({'role': role, 'content': turn['value']})
  if require_answer and not any(message['role'] == 'assistant' for message in messages):
    raise ValueError('conversation has no assistant turn')

  num_placeholders = sum(message['content'].count(IMAGE_PLACEHOLDER) for message in messages)
  if num_placeholders == 0 and num_images > 0:
    first_user = next((m for m in messages if m['role'] == 'user'), None)
    if first_user is None:
      raise ValueError('record has images but no user turn to attach them to')
    first_user['content'] = (IMAGE_PLACEHOLDER + '\n') * num_images + first_user['content']
    num_placeholders = num_images
  if num_placeholders != num_images:
    raise ValueError(
        f'{num_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the text but '
        f'{num_images} image(s) in the record')

  expanded = image_token * num_image_tokens
  for message in messages:
    message['content'] = message['content'].replace(IMAGE_PLACEHOLDER, expanded)
  return messages


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
  return tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
  """Renders `messages` and finds the character span of every assistant reply.

  Each span covers the reply and what the template writes after it up to the next turn
  (its end-of-turn token, e.g. `</s>` or `<|im_end|>`), minus trailing whitespace.

  Returns:
    (rendered text, [(start, end)] character spans into it).

  Raises:
    ValueError: if the template's renderings of prefixes are not prefixes of each other
      (e.g. a template that rewrites earlier turns depending on later ones).
  """
  text = _render(tokenizer, messages, add_generation_prompt=False)
  spans = []
  for k, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    prompt = _render(tokenizer, messages[:k], add_generation_prompt=True)
    with_reply = _render(tokenizer, messages[:k + 1], add_generation_prompt=False)
    if not with_reply.startswith(prompt) or not text.startswith(with_reply):
      raise ValueError(
          'the chat template does not render conversation prefixes as text prefixes; '
          'the assistant turns cannot be located')
    spans.append((len(prompt), len(with_reply.rstrip())))
  return text, spans


def tokenize_messages(tokenizer, messages: list[dict[str, str]]) -> dict[str, np.ndarray]:
  """Renders and tokenizes chat messages and builds the assistant-only loss mask.

  Returns:
    `input_ids` int32 [num_tokens] and `loss_mask` int32 [num_tokens], where
    `loss_mask[i] == 1` iff token i overlaps an assistant reply (end-of-turn included), i.e.
    it is a token the model must learn to predict.
  """
  text, spans = assistant_spans(tokenizer, messages)
  encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  input_ids = np.asarray(encoding['input_ids'], dtype=np.int32)  # [num_tokens]
  offsets = np.asarray(encoding['offset_mapping'], dtype=np.int64).reshape(-1, 2)
  starts, ends = offsets[:, 0], offsets[:, 1]  # [num_tokens] each
  loss_mask = np.zeros(input_ids.shape, dtype=np.int32)  # [num_tokens]
  for span_start, span_end in spans:
    # A token that straddles the span's start (e.g. "ĠThe" after a template ending in a space)
    # is a target too: it carries the reply's first characters.
    overlaps = (ends > span_start) & (starts < span_end)
    empty_inside = (starts == ends) & (starts >= span_start) & (starts < span_end)
    loss_mask[overlaps | empty_inside] = 1
  return {'input_ids': input_ids, 'loss_mask': loss_mask}


def encode_conversation(
    conversations: Sequence[dict[str, Any]],
    *,
    tokenizer,
    num_images: int,
    num_image_tokens: int,
) -> dict[str, np.ndarray]:
  """A LLaVA record's `conversations` -> `input_ids`, `loss_mask` (int32 [num_tokens] each).

  See `to_messages` for the placeholder rules and `tokenize_messages` for the mask.
  """
  messages = to_messages(
      conversations,
      num_images=num_images,
      image_token=tokenizer_lib.image_token_of(tokenizer),
      num_image_tokens=num_image_tokens,
  )
  return tokenize_messages(tokenizer, messages)


def encode_prompt(
    conversations: Sequence[dict[str, Any]],
    *,
    tokenizer,
    num_images: int,
    num_image_tokens: int,
) -> tuple[np.ndarray, str | None]:
  """The prompt of a record's last answer, and that answer (the reference) if it has one.

  The prompt is every turn before the last assistant turn (all turns when the record ends
  with a question), rendered with the template's generation prompt: what the model sees
  when it generates that answer.

  Returns:
    (`input_ids` int32 [num_tokens], the reference answer text or None).

  Raises:
    ValueError: as `to_messages`, or if there is no user turn to answer.
  """
  messages = to_messages(conversations, num_images=num_images,
                         image_token=tokenizer_lib.image_token_of(tokenizer),
                         num_image_tokens=num_image_tokens, require_answer=False)
  reference = None
  if messages[-1]['role'] == 'assistant':
    reference = messages[-1]['content'].strip()
    messages = messages[:-1]
  if not any(message['role'] == 'user' for message in messages):
    raise ValueError('no question (user turn) to answer')
  text = _render(tokenizer, messages, add_generation_prompt=True)
  input_ids = tokenizer(text, add_special_tokens=False)['input_ids']
  return np.asarray(input_ids, dtype=np.int32), reference
