"""An OpenAI-compatible HTTP API over an `Engine`: GET /v1/models, POST /v1/chat/completions.

Requests take OpenAI's fields (`messages` with text and `image_url` parts, `max_tokens` or
`max_completion_tokens`, `temperature`, `top_p`, `stop`, `n`, `seed`, `stream`). Every refusal
is a 4xx JSON body in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and
leaves the server answering. With `stream: true` the answer comes as server-sent events in
OpenAI's chunk format, one chunk per choice once it is generated (not token by token).
"""

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import fastapi
from fastapi import responses
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from openvlm_jax.serving.engine import Engine, RequestError


class ChatRequest(BaseModel):
  """The fields of a chat completion request that the server reads."""

  model: str
  messages: list[dict[str, Any]] = Field(min_length=1)
  max_tokens: int | None = None
  max_completion_tokens: int | None = None
  temperature: float | None = None
  top_p: float = 1.0
  n: int = 1
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False


def _error(status: int, message: str, param: str | None = None,
           code: str | None = None) -> responses.JSONResponse:
  kind = {404: 'not_found_error', 413: 'invalid_request_error',
          429: 'rate_limit_error'}.get(status, 'invalid_request_error')
  return responses.JSONResponse(status_code=status, content={
      'error': {'message': message, 'type': kind, 'param': param, 'code': code}})


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
  """The text before the first stop string, and whether one was found."""
  cuts = [text.index(stop) for stop in stops if stop and stop in text]
  return (text[:min(cuts)], True) if cuts else (text, False)


def make_app(engine: Engine, model_name: str, default_temperature: float = 0.0) -> fastapi.FastAPI:
  """The FastAPI app serving `engine` as model `model_name`."""

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    batcher = asyncio.create_task(engine.batch_forever())
    yield
    batcher.cancel()

  app = fastapi.FastAPI(title='openvlm-jax', lifespan=lifespan)

  @app.exception_handler(RequestError)
  async def refused(request, error: RequestError):
    del request
    return _error(error.status, str(error), error.param, error.code)

  @app.exception_handler(RequestValidationError)
  async def malformed(request, error: RequestValidationError):
    del request
    first = error.errors()[0]
    where = '.'.join(str(part) for part in first.get('loc', ())[1:]) or None
    return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", where)

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [
        {'id': model_name, 'object': 'model', 'created': 0, 'owned_by': 'openvlm-jax'}]}

  @app.post('/v1/chat/completions')
  async def chat_completions(body: ChatRequest):
    if body.model != model_name:
      return _error(404, f'The model {body.model!r} does not exist; this server has '
                    f'{model_name!r}', 'model', 'model_not_found')
    temperature = default_temperature if body.temperature is None else body.temperature
    job = engine.prepare(body.messages, max_tokens=body.max_completion_tokens or body.max_tokens,
                         temperature=temperature, top_p=body.top_p, n=body.n, seed=body.seed)
    answers = await engine.submit(job)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    choices = []
    for index, answer in enumerate(answers):
      text, stopped = _cut_at_stop(answer['text'], stops)
      choices.append({'index': index, 'message': {'role': 'assistant', 'content': text},
                      'finish_reason': 'stop' if stopped else answer['finish_reason']})
    completion_tokens = sum(answer['completion_tokens'] for answer in answers)
    reply = {
        'id': f'chatcmpl-{uuid.uuid4().hex}', 'object': 'chat.completion',
        'created': int(time.time()), 'model': model_name, 'choices': choices,
        'usage': {'prompt_tokens': job.prompt_tokens, 'completion_tokens': completion_tokens,
                  'total_tokens': job.prompt_tokens + completion_tokens}}
    if not body.stream:
      return reply
    return responses.StreamingResponse(_events(reply), media_type='text/event-stream')

  return app


def _events(reply: dict[str, Any]):
  """A finished completion as OpenAI's `chat.completion.chunk` server-sent events."""
  def chunk(choice_index: int, delta: dict, finish_reason: str | None) -> str:
    body = {'id': reply['id'], 'object': 'chat.completion.chunk', 'created': reply['created'],
            'model': reply['model'],
            'choices': [{'index': choice_index, 'delta': delta, 'finish_reason': finish_reason}]}
    return f'data: {json.dumps(body)}\n\n'

  for choice in reply['choices']:
    yield chunk(choice['index'], {'role': 'assistant', 'content': ''}, None)
    yield chunk(choice['index'], {'content': choice['message']['content']}, None)
    yield chunk(choice['index'], {}, choice['finish_reason'])
  yield 'data: [DONE]\n\n'
