"""``GET /health``: liveness, without authentication."""

from __future__ import annotations

from fastapi import APIRouter
from noxsdk.models import Health

from nox_api._version import __version__

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness check (no token needed)")
def health() -> Health:
    return Health(status="ok", version=__version__)
