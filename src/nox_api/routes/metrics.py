"""``GET /metrics``: Prometheus' text format (see docs/operations.md, "Metrics").

Not behind the API's tokens: a scraper should not hold a token that can read workspaces. Clients
on the loopback address may scrape (``NOX_METRICS_LOOPBACK``, on by default); others must send
``Authorization: Bearer <NOX_METRICS_TOKEN>``, compared in constant time. Without a configured
token, only loopback clients get the metrics.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from nox_api.deps import NoxDep, client_address
from nox_api.errors import Forbidden, Unauthorized
from nox_api.observability.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # not an address ("unknown", a test client's name): not loopback
        return False


@router.get(
    "/metrics",
    summary="Prometheus metrics (loopback, or the scrape token NOX_METRICS_TOKEN)",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"},
        401: {"description": "Not from loopback and no scrape token sent"},
        403: {"description": "A wrong scrape token, or no scrape token configured"},
    },
)
async def metrics(request: Request, nox: NoxDep) -> Response:
    settings = nox.settings
    if not (settings.metrics_loopback and _loopback(client_address(request))):
        expected = settings.metrics_token
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if not header:
            raise Unauthorized(
                "metrics need the scrape token: 'Authorization: Bearer <NOX_METRICS_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if (
            expected is None
            or scheme.lower() != "bearer"
            or not hmac.compare_digest(
                secret.strip().encode(), expected.get_secret_value().encode()
            )
        ):
            raise Forbidden("wrong scrape token (or NOX_METRICS_TOKEN is not set)")
    body = await run_in_threadpool(nox.metrics.render)  # reads the database and the health
    return Response(body, media_type=CONTENT_TYPE)
