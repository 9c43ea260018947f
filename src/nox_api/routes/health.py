"""``GET /health``: liveness, without authentication."""

from __future__ import annotations

from fastapi import APIRouter

from nox_api._version import __version__
from noxsdk.models import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness check (no token needed)")
async def health() -> Health:
    return Health(status="ok", version=__version__)
