"""The OpenAI requests our server accepts (types only: value ranges are SamplingParams' and
check_messages' job), what it refuses by name, and its error body.

Every field a client may send is either honoured or refused with a 400 naming it; none is
silently ignored (see SUPPORTED in the README's table). Fields no OpenAI client relies on for
the answer's content (user, metadata, store, service_tier, parallel_tool_calls ...) are
ignored, as OpenAI's own optional hints.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from .errors import EngineError, InvalidRequest
from .settings import SamplingParams

# request field -> SamplingParams field (OpenAI names plus the extensions vLLM/LMDeploy accept)
SAMPLING_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                   "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "repetition_penalty": "repetition_penalty", "frequency_penalty": "frequency_penalty",
                   "presence_penalty": "presence_penalty", "stop": "stop", "seed": "seed",
                   "ignore_eos": "ignore_eos", "response_format": "response_format"}
MAX_N = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    repetition_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool | None = None
    logit_bias: dict[str, Any] | None = None

    def check(self) -> None:
        """Refuse, naming the field, what this server does not do; check combinations."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options: only allowed when stream is true", param="stream_options")
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be an integer in [1, {MAX_N}], got {self.n}", param="n")
        if self.logit_bias:
            raise InvalidRequest("logit_bias: not supported by this server", param="logit_bias")

    def sampling(self) -> SamplingParams:
        """SamplingParams from the request; a bad value raises InvalidRequest naming the request
        field (max_tokens, not max_new_tokens)."""
        params = SamplingParams()
        for key, attr in SAMPLING_FIELDS.items():
            if getattr(self, key, None) is not None:
                setattr(params, attr, getattr(self, key))
        try:
            return params.validate()
        except InvalidRequest as exc:
            raise self.in_request_terms(exc) from None

    def choices(self, sampling: SamplingParams) -> list[SamplingParams]:
        """One SamplingParams per requested choice (n); with a seed, choice i uses seed + i so
        the n answers differ and each is reproducible."""
        n = self.n or 1
        return [sampling if sampling.seed is None or i == 0 else dataclasses.replace(sampling, seed=sampling.seed + i)
                for i in range(n)]

    def in_request_terms(self, exc: EngineError) -> EngineError:
        """The same error, naming the request's field where it names a SamplingParams one."""
        names = [k for k, v in SAMPLING_FIELDS.items() if v == exc.param and getattr(self, k, None) is not None]
        if not names or not isinstance(exc, InvalidRequest):
            return exc
        return type(exc)(exc.message.replace(exc.param, names[0], 1), param=names[0])


class ChatCompletionRequest(_Request):
    messages: list[Any]
    max_completion_tokens: StrictInt | None = None
    # vLLM's names for going on with the last (assistant) message instead of a new reply
    continue_final_message: StrictBool | None = None
    add_generation_prompt: StrictBool | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: StrictStr | dict[str, Any] | None = None

    def check(self) -> None:
        super().check()
        if self.logprobs:
            raise InvalidRequest("logprobs: not supported by this server", param="logprobs")
        if self.top_logprobs is not None:
            raise InvalidRequest("top_logprobs: not supported by this server", param="top_logprobs")
        if self.tools or self.functions:
            name = "tools" if self.tools else "functions"
            raise InvalidRequest(f"{name}: tool calling is not supported by this server", param=name)
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise InvalidRequest(f"{name}: tool calling is not supported by this server", param=name)
        if self.add_generation_prompt is False and not self.continue_final:
            raise InvalidRequest("add_generation_prompt: false needs continue_final_message: true",
                                 param="add_generation_prompt")

    @property
    def continue_final(self) -> bool:
        """Go on with the last message: vLLM's continue_final_message, or the `prefix: true`
        mark on an assistant message last (DeepSeek's, Qwen's, Moonshot's prefix completion)."""
        last = self.messages[-1] if self.messages else None
        return bool(self.continue_final_message) or (isinstance(last, dict) and last.get("prefix") is True
                                                     and last.get("role") == "assistant")


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr]
    echo: StrictBool | None = None
    suffix: StrictStr | None = None
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise InvalidRequest("prompt: give one prompt (a string, or a list of one)", param="prompt")
        if self.echo:
            raise InvalidRequest("echo: not supported by this server", param="echo")
        if self.suffix:
            raise InvalidRequest("suffix: not supported by this server", param="suffix")
        if self.logprobs is not None:
            raise InvalidRequest("logprobs: not supported by this server", param="logprobs")
        if self.best_of not in (None, 1):
            raise InvalidRequest("best_of: only 1 is supported", param="best_of")

    @property
    def text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt

    def sampling(self) -> SamplingParams:
        if self.max_tokens is None:  # OpenAI's default for completions
            self.max_tokens = 16
        return super().sampling()


def _load(raw: bytes, model: type[BaseModel]) -> Any:
    """Request body -> request model, or InvalidRequest naming the field."""
    try:
        body = json.loads(raw or b"null")
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        raise InvalidRequest(f"{field}: {err['msg']}" if field else err["msg"], param=field) from None
    req.check()
    return req


def parse_request(raw: bytes) -> ChatCompletionRequest:
    return _load(raw, ChatCompletionRequest)


def parse_completion_request(raw: bytes) -> CompletionRequest:
    return _load(raw, CompletionRequest)


def error_body(exc: EngineError) -> dict:
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}
