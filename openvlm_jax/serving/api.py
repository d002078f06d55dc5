"""An OpenAI-compatible HTTP API over an `Engine`: GET /v1/models, POST /v1/chat/completions.

Requests take OpenAI's fields (`messages` with text and `image_url` parts, `max_tokens` or
`max_completion_tokens`, `temperature`, `top_p`, `stop`, `n`, `seed`, `stream`). Every refusal
is a 4xx JSON body in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and
leaves the server answering. With `stream: true` the answer comes as server-sent events in
OpenAI's chunk format while it is decoded: a role chunk per choice, then content deltas as
the text settles, a closing chunk per choice with its finish reason, and `[DONE]`.
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
                         temperature=temperature, top_p=body.top_p, n=body.n, seed=body.seed,
                         stop=body.stop, stream=body.stream)
    head = {'id': f'chatcmpl-{uuid.uuid4().hex}', 'created': int(time.time()),
            'model': model_name}
    if body.stream:
      return responses.StreamingResponse(_events(engine, job, head),
                                         media_type='text/event-stream')
    answers = await engine.submit(job)
    choices = [{'index': index, 'message': {'role': 'assistant', 'content': answer['text']},
                'finish_reason': answer['finish_reason']}
               for index, answer in enumerate(answers)]
    return {**head, 'object': 'chat.completion', 'choices': choices,
            'usage': _usage(job, answers)}

  return app


def _usage(job, answers) -> dict[str, int]:
  completion_tokens = sum(answer['completion_tokens'] for answer in answers)
  return {'prompt_tokens': job.prompt_tokens, 'completion_tokens': completion_tokens,
          'total_tokens': job.prompt_tokens + completion_tokens}


def _events(engine: Engine, job, head: dict[str, Any]):
  """A streamed completion as OpenAI's `chat.completion.chunk` server-sent events.

  The job is queued before the response starts (so a full queue is still a 429); the
  engine's decoder thread hands text deltas to this request's queue, which ends (None) once
  the job's future is settled, with answers or an error.
  """
  loop = asyncio.get_running_loop()
  deltas: asyncio.Queue = asyncio.Queue()
  job.on_delta = lambda choice, text: loop.call_soon_threadsafe(deltas.put_nowait,
                                                                (choice, text))
  answers = engine.enqueue(job)
  answers.add_done_callback(lambda _: deltas.put_nowait(None))

  def chunk(choice: int, delta: dict, finish_reason: str | None = None) -> str:
    body = {**head, 'object': 'chat.completion.chunk',
            'choices': [{'index': choice, 'delta': delta, 'finish_reason': finish_reason}]}
    return f'data: {json.dumps(body)}\n\n'

  async def events():
    for choice in range(job.n):
      yield chunk(choice, {'role': 'assistant', 'content': ''})
    while (item := await deltas.get()) is not None:
      yield chunk(item[0], {'content': item[1]})
    if answers.exception() is not None:  # the decoder failed after the stream began
      yield f'data: {json.dumps({"error": {"message": str(answers.exception())}})}\n\n'
      return
    for choice, answer in enumerate(answers.result()):
      yield chunk(choice, {}, answer['finish_reason'])
    yield 'data: [DONE]\n\n'

  return events()
