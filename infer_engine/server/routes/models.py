"""GET /v1/models and GET /v1/models/{id}: the one model this server serves."""
from __future__ import annotations

from fastapi import APIRouter, Request

from ...errors import ModelNotFound
from ..context import server_of

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    server = server_of(request)
    if (denied := server.unauthorized(request)) is not None:
        return denied
    return {"object": "list", "data": [server.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    server = server_of(request)
    if (denied := server.unauthorized(request)) is not None:
        return denied
    if model_id != server.name:
        return server.error(ModelNotFound(f"The model {model_id!r} does not exist; this server serves "
                                          f"{server.name!r}", param="model"), path=request.url.path)
    return server.model_card()
