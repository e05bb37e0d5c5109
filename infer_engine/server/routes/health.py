"""GET /health: the process answers (the proxy's heartbeat; the app's supervisor waits for it)."""
from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}
