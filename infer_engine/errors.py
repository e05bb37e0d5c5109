"""Errors every backend raises, so the UI and the server can map them without knowing backends."""
from __future__ import annotations


class EngineError(Exception):
    """Base class. `status` is the HTTP status our server answers with."""

    status = 500
    kind = "internal_error"
    code: str | None = None  # OpenAI's error code (a string or null)

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(EngineError, ValueError):
    """Bad sampling values, malformed messages, bad settings (names the field in `param`)."""

    status = 400
    kind = "invalid_request_error"


class ContextOverflow(InvalidRequest):
    """The newest message alone does not fit into the context window. `max_new_tokens_that_fit`
    says how many new tokens would still fit with this prompt (None: not even a few)."""

    def __init__(self, message: str, param: str | None = None, max_new_tokens_that_fit: int | None = None):
        super().__init__(message, param)
        self.max_new_tokens_that_fit = max_new_tokens_that_fit


ContextOverflow.code = "context_length_exceeded"


class SessionBusy(InvalidRequest):
    """The session id already has a generation running (one at a time per session)."""


class AuthenticationFailed(EngineError):
    status = 401
    kind = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(EngineError):
    status = 404
    kind = "not_found_error"
    code = "model_not_found"


class BackendUnavailable(EngineError):
    """Remote server down, unreachable or failing with 5xx after retries."""

    status = 503
    kind = "backend_unavailable"


class UnsupportedMediaType(InvalidRequest):
    """A request body that is not JSON (text/plain, form data)."""

    status = 415
