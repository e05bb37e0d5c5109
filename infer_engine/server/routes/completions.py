"""POST /v1/completions: a plain prompt continued (no chat template)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ...protocol import CompletionRequest, parse_completion_request
from ..context import Call, server_of

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request):
    server = server_of(request)

    def open_stream(req: CompletionRequest, sampling: Any, sid: str) -> Any:
        return server.engine.stream_completion(req.text, sampling, sid)
    return await server.start(request, Call("/v1/completions", "text_completion", "cmpl", False),
                              parse_completion_request, open_stream)
