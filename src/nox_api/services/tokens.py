"""API tokens: random secrets shown once, stored as SHA-256 hashes, each with a role and a
workspace. ``NOX_API_TOKEN``, when set, is accepted as an admin token of the default workspace."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from nox_api.errors import InvalidRequest, NotFound
from nox_api.services.token_cache import PrincipalCache, RevocationMark
from nox_api.storage.db import Database
from nox_api.storage.models import TokenRow

__all__ = [
    "DEFAULT_WORKSPACE",
    "IssuedToken",
    "Principal",
    "Role",
    "TOKEN_PREFIX",
    "TokenInfo",
    "TokenService",
    "is_workspace_name",
    "validate_workspace_name",
]

TOKEN_PREFIX = "nox_"  # noqa: S105 - a prefix, not a secret; lets secret scanners recognise a leaked Nox token
DEFAULT_WORKSPACE = "default"
_WORKSPACE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_NAME_RE = re.compile(r"[\w .@:/+-]{1,128}")


class Role(StrEnum):
    VIEWER = "viewer"
    RUNNER = "runner"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a stored token, or the environment's admin token (id ``env``)."""

    id: str
    name: str
    role: Role
    workspace: str


@dataclass(frozen=True, slots=True)
class IssuedToken:
    principal: Principal
    secret: str  # shown once, never stored
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A stored token as listings show it: never its secret or hash."""

    id: str
    name: str
    role: Role
    workspace: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        now = datetime.now(UTC)
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


def _info(row: TokenRow) -> TokenInfo:
    return TokenInfo(
        row.id,
        row.name,
        Role(row.role),
        row.workspace,
        row.created_at,
        row.expires_at,
        row.revoked_at,
    )


def is_workspace_name(name: str) -> bool:
    """The one rule for workspace names (tokens, routes, the policy's quotas)."""
    return _WORKSPACE_RE.fullmatch(name) is not None


def validate_workspace_name(name: str) -> str:
    if not is_workspace_name(name):
        raise InvalidRequest(
            f"workspace name {name[:70]!r} must be 1-63 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


# Built once: building a statement per request costs more than running it.
_BY_HASH = select(
    TokenRow.id, TokenRow.name, TokenRow.role, TokenRow.workspace,
    TokenRow.expires_at, TokenRow.revoked_at,
).where(TokenRow.token_hash == bindparam("digest"))  # fmt: skip


def _by_id(session: Session, token_id: str) -> TokenRow | None:
    # No id holds a NUL, which PostgreSQL refuses even as a query's parameter.
    return None if "\x00" in token_id else session.get(TokenRow, token_id)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenService:
    def __init__(self, db: Database, env_token: str | None = None) -> None:
        self._db = db
        self._env_token = env_token
        self._mark = RevocationMark.of(db)
        self._cache = None if self._mark is None else PrincipalCache(self._mark)

    def create(
        self,
        name: str,
        role: Role,
        workspace: str = DEFAULT_WORKSPACE,
        expires_in_days: int | None = None,
    ) -> IssuedToken:
        if not _NAME_RE.fullmatch(name):
            raise InvalidRequest(
                "token name must be 1-128 letters, digits, spaces or . @ : / + - _"
            )
        validate_workspace_name(workspace)
        if expires_in_days is not None and not 1 <= expires_in_days <= 3650:
            raise InvalidRequest("expires_in_days must be between 1 and 3650")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        expires = now + timedelta(days=expires_in_days) if expires_in_days else None
        row = TokenRow(
            id=secrets.token_hex(8),
            name=name,
            role=role.value,
            workspace=workspace,
            token_hash=hash_secret(secret),
            created_at=now,
            expires_at=expires,
        )
        with self._db.session() as session:
            session.add(row)
        principal = Principal(row.id, name, role, workspace)
        return IssuedToken(principal, secret, now, expires)

    def count(self) -> int:
        with self._db.session() as session:
            return int(session.scalar(select(func.count()).select_from(TokenRow)) or 0)

    def list(self, workspace: str | None = None) -> list[TokenInfo]:
        """Stored tokens, newest first, of one workspace or all."""
        query = select(TokenRow).order_by(TokenRow.created_at.desc(), TokenRow.id)
        if workspace is not None:
            query = query.where(TokenRow.workspace == workspace)
        with self._db.session() as session:
            return [_info(row) for row in session.scalars(query)]

    def get(self, token_id: str) -> TokenInfo | None:
        with self._db.session() as session:
            row = _by_id(session, token_id)
            return None if row is None else _info(row)

    def revoke(self, token_id: str) -> TokenInfo:
        """Revoke a token: it stops working at the next request. Revoking twice is fine."""
        with self._db.session() as session:
            row = _by_id(session, token_id)
            if row is None:
                raise NotFound(f"no token with id {token_id[:40]!r}")
            newly = row.revoked_at is None
            if newly:
                row.revoked_at = datetime.now(UTC)
            info = _info(row)
        if newly:
            self.changed()  # committed: now every process's cache forgets its tokens
        return info

    def changed(self) -> None:
        """Say that stored tokens changed other than by :meth:`create` (a revocation, a restore
        of the database): cached authentications of every process on this database end."""
        if self._cache is not None:
            self._cache.forget()
        if self._mark is not None:
            self._mark.bump()

    def authenticate(self, secret: str) -> Principal | None:
        """The principal of a bearer secret, or None for an unknown, expired or revoked one."""
        if self._env_token is not None and hmac.compare_digest(
            secret.encode(), self._env_token.encode()
        ):
            return Principal("env", "NOX_API_TOKEN", Role.ADMIN, DEFAULT_WORKSPACE)
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 256:
            return None
        # Looking up by the SHA-256 of the secret: the index compares hashes, never secrets,
        # so timing reveals nothing about a stored secret.
        digest = hash_secret(secret)
        now = datetime.now(UTC)
        cache, mark = self._cache, None
        if cache is not None:
            mark = cache.mark()  # read before the query: see services/token_cache.py
            known = cache.get(digest, mark, now)
            if known is not None:
                return known
        found = self._lookup(digest, now)
        if found is None:
            return None
        principal, expires_at = found
        if cache is not None:
            cache.put(digest, principal, expires_at, mark)
        return principal

    def _lookup(self, digest: str, now: datetime) -> tuple[Principal, datetime | None] | None:
        """The stored token of ``digest`` and its expiry, if it is valid now."""
        with self._db.connection() as conn:  # one indexed row: a plain query, no ORM session
            row = conn.execute(_BY_HASH, {"digest": digest}).first()
        if row is None:
            return None
        token_id, name, role, workspace, expires_at, revoked_at = row
        if revoked_at is not None or (expires_at is not None and expires_at <= now):
            return None
        return Principal(token_id, name, Role(role), workspace), expires_at
