"""The OpenAI chat-completions request as our server accepts it (types only: value ranges are
SamplingParams' and check_messages' job), and its error body."""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from .errors import EngineError, InvalidRequest
from .settings import SamplingParams

# request field -> SamplingParams field (OpenAI names plus the extensions vLLM/LMDeploy accept)
SAMPLING_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                   "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "repetition_penalty": "repetition_penalty", "stop": "stop", "seed": "seed",
                   "ignore_eos": "ignore_eos"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send fields this server does not use (user, presence_penalty, ...): ignored.
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    messages: list[Any]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    repetition_penalty: StrictFloat | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool | None = None

    def sampling(self) -> SamplingParams:
        """SamplingParams from the request; a bad value raises InvalidRequest naming the request
        field (max_tokens, not max_new_tokens)."""
        params = SamplingParams()
        for key, attr in SAMPLING_FIELDS.items():
            if getattr(self, key) is not None:
                setattr(params, attr, getattr(self, key))
        try:
            return params.validate()
        except InvalidRequest as exc:
            raise self.in_request_terms(exc) from None

    def in_request_terms(self, exc: EngineError) -> EngineError:
        """The same error, naming the request's field where it names a SamplingParams one."""
        names = [k for k, v in SAMPLING_FIELDS.items() if v == exc.param and getattr(self, k) is not None]
        if not names or not isinstance(exc, InvalidRequest):
            return exc
        return type(exc)(exc.message.replace(exc.param, names[0], 1), param=names[0])


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """Request body -> ChatCompletionRequest, or InvalidRequest naming the field."""
    try:
        body = json.loads(raw or b"null")
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(body)
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        raise InvalidRequest(f"{field}: {err['msg']}" if field else err["msg"], param=field) from None


def error_body(exc: EngineError) -> dict:
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.status}}
