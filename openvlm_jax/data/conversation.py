"""LLaVA conversations -> token ids and an assistant-only loss mask, for any chat template.

Templates take message content in one of two conventions, found once per template by
rendering a probe (`template_style`): a plain string (`{"role", "content": str}`), or typed
parts (`"content": [{"type": "image"}, {"type": "text", "text": ...}]`, as the templates of
llava-hf, Qwen2-VL, Idefics3 and Gemma 3 processors expect). Each image is rendered as one
image token and widened to `num_image_tokens` copies after tokenization, as Hugging Face's
LlavaProcessor does.

The assistant replies are the template's `{% generation %}` blocks when it has them, and
wherever possible they are (also) located by rendering prefixes of the conversation: the text that `messages[:k+1]`
adds to `messages[:k]` + generation prompt is exactly the k-th reply as the template writes
it (content and end-of-turn token). Tokens whose character offsets start inside those spans
are the training targets. A conversation whose mask comes out empty is an error, never a
silent zero loss.
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from openvlm_jax.console import UserError
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

_GENERATION_BLOCK = re.compile(r'\{%-?\s*generation\s*-?%\}')
_PROBE_QUESTION, _PROBE_REPLY = 'Which value does the probe show?', 'The probe shows 42.'


@dataclasses.dataclass(frozen=True)
class TemplateStyle:
  """How a chat template takes its messages.

  typed_content: content is a list of `{"type": "image"}` / `{"type": "text"}` parts.
  generation_blocks: the template marks assistant replies with `{% generation %}`.
  """

  typed_content: bool
  generation_blocks: bool


_STYLES: dict[str, TemplateStyle] = {}


def _probe_messages(typed: bool) -> list[dict[str, Any]]:
  turns = [('user', _PROBE_QUESTION), ('assistant', _PROBE_REPLY)]
  return [{'role': role, 'content': [{'type': 'text', 'text': text}] if typed else text}
          for role, text in turns]


def _renders_probe(tokenizer, typed: bool) -> bool:
  try:
    text = _render(tokenizer, _probe_messages(typed), add_generation_prompt=False)
  except Exception:  # noqa: BLE001 (a template may raise anything for content it cannot take)
    return False
  return _PROBE_QUESTION in text and _PROBE_REPLY in text


def template_style(tokenizer) -> TemplateStyle:
  """The content convention of the tokenizer's chat template (probed once per template).

  Raises:
    UserError: the tokenizer has no chat template, or its template renders the probe's
      question and reply neither from string content nor from typed text parts.
  """
  template = getattr(tokenizer, 'chat_template', None)
  name = getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'
  if not template:
    raise UserError(f'{name}: the tokenizer has no chat_template; set one (e.g. '
                    'config.tokenizer pointing at a folder with chat_template.jinja)')
  if not isinstance(template, str):
    raise UserError(f'{name}: several named chat templates; keep the default one only')
  if template not in _STYLES:
    if _renders_probe(tokenizer, typed=False):
      typed = False
    elif _renders_probe(tokenizer, typed=True):
      typed = True
    else:
      raise UserError(
          f'{name}: the chat template renders a user/assistant exchange neither from string '
          'content nor from typed [{"type": "text", "text": ...}] parts, so no reply could '
          'be trained on; use a template that writes message content')
    _STYLES[template] = TemplateStyle(
        typed_content=typed, generation_blocks=bool(_GENERATION_BLOCK.search(template)))
  return _STYLES[template]


def _typed_parts(content: str) -> list[dict[str, str]]:
  """'<image>\\nWhat is it?' -> [{'type': 'image'}, {'type': 'text', 'text': 'What is it?'}].

  The newline LLaVA data puts after a placeholder is dropped: typed templates write their
  own separator after an image.
  """
  parts = []
  for index, piece in enumerate(content.split(IMAGE_PLACEHOLDER)):
    if index:
      parts.append({'type': 'image'})
      piece = piece.removeprefix('\n')
    if piece:
      parts.append({'type': 'text', 'text': piece})
  return parts


def message_text(message: dict[str, Any]) -> str:
  """A message's text: its string content, or its text parts joined."""
  content = message['content']
  if isinstance(content, str):
    return content
  return ''.join(part['text'] for part in content if part['type'] == 'text')


def to_messages(
    conversations: Sequence[dict[str, Any]],
    *,
    num_images: int,
    image_token: str,
    typed_content: bool = False,
    require_answer: bool = True,
) -> list[dict[str, Any]]:
  """Turns LLaVA turns into chat messages, one image token (or image part) per image.

  Args:
    conversations: `[{"from": "human"|"gpt"|"user"|"assistant"|"system", "value": str}]`.
    num_images: images attached to the record. If there are images but no `<image>` in the
      text, one placeholder per image is prepended to the first user turn, as LLaVA does.
    image_token: the tokenizer's image token, which replaces each placeholder in string
      content.
    typed_content: content as typed parts (`template_style(...).typed_content`), with an
      `{"type": "image"}` part where each placeholder was.
    require_answer: a conversation without an assistant turn is an error (training); False
      for a question to be answered.

  Returns:
    `[{"role": "user"|"assistant"|"system", "content": str | [part, ...]}]`.

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

  for message in messages:
    if typed_content:
      message['content'] = _typed_parts(message['content'])
    else:
      message['content'] = message['content'].replace(IMAGE_PLACEHOLDER, image_token)
  return messages


def _render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
  return tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
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


def _prefix_method(tokenizer, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and loss mask from the assistant spans' character offsets."""
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
  return input_ids, loss_mask


def _generation_blocks(tokenizer, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and loss mask from the template's `{% generation %}` blocks (transformers).

  Where the prefix method also applies, its spans are added: a block often starts after
  what the template writes between the generation prompt and the reply (llava-hf's
  "ASSISTANT:" is followed by " " outside the block), and the model generates that too.
  """
  encoding = tokenizer.apply_chat_template(
      messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  input_ids = np.asarray(encoding['input_ids'], dtype=np.int32)  # [num_tokens]
  loss_mask = np.asarray(encoding['assistant_masks'], dtype=np.int32)  # [num_tokens]
  try:
    prefix_ids, prefix_mask = _prefix_method(tokenizer, messages)
  except ValueError:  # the template rewrites earlier turns: the blocks alone
    return input_ids, loss_mask
  if np.array_equal(prefix_ids, input_ids):
    loss_mask = loss_mask | prefix_mask
  return input_ids, loss_mask


def widen_image_tokens(input_ids: np.ndarray, loss_mask: np.ndarray, *,
                       image_token_id: int | None, num_image_tokens: int | Sequence[int],
                       num_images: int) -> dict[str, np.ndarray]:
  """Repeats each image token `num_image_tokens` times (never a target); a sequence gives
  each image its own count (anyres images, whose tokens follow their size).

  `image_token_id` None (a text-only tokenizer) is allowed for a text-only conversation.

  Raises:
    ValueError: the rendered text holds a different number of image tokens than images
      (the template drops or adds images, or the image token is split by the tokenizer).
  """
  if image_token_id is None:
    image_token_id = -1  # matches no token
  is_image = input_ids == image_token_id  # [num_tokens]
  if int(is_image.sum()) != num_images:
    raise ValueError(f'the chat template wrote {int(is_image.sum())} image token(s) for '
                     f'{num_images} image(s)')
  repeats = np.ones(len(input_ids), np.int64)
  repeats[is_image] = num_image_tokens
  loss_mask = np.where(is_image, 0, loss_mask)
  return {'input_ids': np.repeat(input_ids, repeats).astype(np.int32),
          'loss_mask': np.repeat(loss_mask, repeats).astype(np.int32)}


def image_token_id(tokenizer, num_images: int) -> int | None:
  """The image token's id; None for a tokenizer without one when there is no image."""
  image_token = (tokenizer_lib.image_token_of(tokenizer) if num_images
                 else tokenizer_lib.find_image_token(tokenizer))
  return None if image_token is None else tokenizer.convert_tokens_to_ids(image_token)


def tokenize_messages(tokenizer, messages: list[dict[str, Any]], *, num_images: int,
                      num_image_tokens: int | Sequence[int]) -> dict[str, np.ndarray]:
  """Renders and tokenizes chat messages and builds the assistant-only loss mask.

  Returns:
    `input_ids` int32 [num_tokens] and `loss_mask` int32 [num_tokens], where
    `loss_mask[i] == 1` iff token i overlaps an assistant reply (end-of-turn included), i.e.
    it is a token the model must learn to predict; each image is `num_image_tokens` tokens
    (or its own entry of them).

  Raises:
    ValueError: no token is left to train on, or the image tokens do not match the images.
  """
  if template_style(tokenizer).generation_blocks:
    input_ids, loss_mask = _generation_blocks(tokenizer, messages)
  else:
    input_ids, loss_mask = _prefix_method(tokenizer, messages)
  if not loss_mask.any():
    raise ValueError('the loss mask is empty: the chat template renders no assistant reply '
                     'text for this conversation')
  return widen_image_tokens(input_ids, loss_mask,
                            image_token_id=image_token_id(tokenizer, num_images),
                            num_image_tokens=num_image_tokens, num_images=num_images)


def _messages_for(conversations, tokenizer, num_images: int,
                  require_answer: bool) -> list[dict[str, Any]]:
  image_token = tokenizer_lib.image_token_of(tokenizer) if num_images else IMAGE_PLACEHOLDER
  return to_messages(conversations, num_images=num_images, image_token=image_token,
                     typed_content=template_style(tokenizer).typed_content,
                     require_answer=require_answer)


def encode_conversation(
    conversations: Sequence[dict[str, Any]],
    *,
    tokenizer,
    num_images: int,
    num_image_tokens: int | Sequence[int],
) -> dict[str, np.ndarray]:
  """A LLaVA record's `conversations` -> `input_ids`, `loss_mask` (int32 [num_tokens] each).

  See `to_messages` for the placeholder rules and `tokenize_messages` for the mask.
  """
  messages = _messages_for(conversations, tokenizer, num_images, require_answer=True)
  return tokenize_messages(tokenizer, messages, num_images=num_images,
                           num_image_tokens=num_image_tokens)


def encode_prompt(
    conversations: Sequence[dict[str, Any]],
    *,
    tokenizer,
    num_images: int,
    num_image_tokens: int | Sequence[int],
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
  messages = _messages_for(conversations, tokenizer, num_images, require_answer=False)
  reference = None
  if messages[-1]['role'] == 'assistant':
    reference = message_text(messages[-1]).strip()
    messages = messages[:-1]
  if not any(message['role'] == 'user' for message in messages):
    raise ValueError('no question (user turn) to answer')
  text = _render(tokenizer, messages, add_generation_prompt=True)
  input_ids = np.asarray(tokenizer(text, add_special_tokens=False)['input_ids'], dtype=np.int32)
  widened = widen_image_tokens(input_ids, np.zeros_like(input_ids),
                               image_token_id=image_token_id(tokenizer, num_images),
                               num_image_tokens=num_image_tokens, num_images=num_images)
  return widened['input_ids'], reference
