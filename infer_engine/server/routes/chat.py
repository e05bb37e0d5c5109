"""POST /v1/chat/completions: a conversation answered (n choices, streamed or not)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ...base import check_messages
from ...protocol import ChatCompletionRequest, parse_request
from ..context import Call, server_of

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    server = server_of(request)

    def open_stream(req: ChatCompletionRequest, sampling: Any, sid: str) -> Any:
        final = req.continue_final
        return server.engine.stream_chat(check_messages(req.messages, final), sampling, sid, final)
    return await server.start(request, Call("/v1/chat/completions", "chat.completion", "chatcmpl", True),
                              parse_request, open_stream)
