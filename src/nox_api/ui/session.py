"""The dashboard's sign-in session and its CSRF tokens.

A session is a cookie (``nox_session``: HttpOnly, SameSite=Strict, path ``/ui``, Secure over
HTTPS) holding the signed-in token, encrypted and signed with Fernet (AES-128-CBC and
HMAC-SHA256, with the time it was made): the browser keeps it, JavaScript never reads it, and
the server needs no session table. Every request opens it and authenticates the token again, so
revoking the token ends the session at once. Each session carries a random nonce; its CSRF token
is the HMAC of that nonce, put in every form and checked on every state-changing request
(synchronizer token). The sign-in form has its own pair: a random ``nox_login`` cookie and the
HMAC of it in the form.

The keys come from ``NOX_UI_SESSION_SECRET`` or, when it is unset, from ``ui-session.key`` in the
data folder (32 random bytes, made mode 0600 on first use); both keys are derived from it with
HKDF, one for the cookie and one for the CSRF tokens.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nox_api.config import Settings

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "KEY_FILE",
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "Session",
    "SessionKeeper",
    "load_or_create_secret",
]

SESSION_COOKIE = "nox_session"
LOGIN_COOKIE = "nox_login"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
KEY_FILE = "ui-session.key"
_NONCE_BYTES = 16
_MAX_TOKEN_CHARS = 256  # the longest secret TokenService.authenticate looks up
# Signed-out sessions remembered until they would have expired anyway: a bound on memory, far
# above what sign-outs (each needs a valid session and counts against its token's rate) reach.
_MAX_SIGNED_OUT = 100_000


@dataclass(frozen=True, slots=True)
class Session:
    """What a session cookie holds once opened."""

    token: str  # the bearer token the user signed in with
    nonce: str  # random, per sign-in: the CSRF token is derived from it
    issued_at: int  # Unix time of the sign-in


def _derive(secret: bytes, label: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label.encode()).derive(secret)


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class SessionKeeper:
    """Makes and opens session cookies, makes and checks CSRF tokens."""

    def __init__(self, secret: bytes, max_age_s: int) -> None:
        self.max_age_s = max_age_s
        self._fernet = Fernet(base64.urlsafe_b64encode(_derive(secret, "nox-ui-session-cookie")))
        self._csrf_key = _derive(secret, "nox-ui-csrf")
        self._signed_out: dict[str, float] = {}  # nonce -> Unix time it would expire
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionKeeper:
        configured = settings.ui_session_secret
        if configured is not None:
            secret = configured.get_secret_value().encode()
        else:
            secret = load_or_create_secret(settings.data_path)
        return cls(secret, settings.ui_session_max_age_s)

    # -- sessions -------------------------------------------------------------------------------
    def seal(self, token: str, issued_at: int | None = None) -> tuple[str, Session]:
        """A new session for ``token`` (made now, or at ``issued_at``): the cookie's value and
        the session."""
        when = int(time.time()) if issued_at is None else issued_at
        session = Session(token, secrets.token_hex(_NONCE_BYTES), when)
        payload = json.dumps({"t": session.token, "n": session.nonce}, separators=(",", ":"))
        return self._fernet.encrypt_at_time(payload.encode(), session.issued_at).decode(), session

    def open(self, cookie: str | None) -> Session | None:
        """The session of a cookie; None when it is missing, forged, altered, older than the
        session lifetime, or signed out."""
        if not cookie or len(cookie) > 4096:
            return None
        try:
            raw = cookie.encode("ascii")
            payload = self._fernet.decrypt(raw, ttl=self.max_age_s)
            issued_at = self._fernet.extract_timestamp(raw)
            data = json.loads(payload)
            token, nonce = data["t"], data["n"]
        except (InvalidToken, UnicodeError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(token, str) or not isinstance(nonce, str):
            return None
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        with self._lock:
            if nonce in self._signed_out:
                return None
        return Session(token, nonce, issued_at)

    def sign_out(self, session: Session) -> None:
        """Refuse this session's cookie from now on, in this server process (the browser drops
        it too; a copy taken before is refused until the session would have expired)."""
        now = time.time()
        with self._lock:
            for nonce, expires in list(self._signed_out.items()):
                if expires <= now:
                    del self._signed_out[nonce]
            if len(self._signed_out) >= _MAX_SIGNED_OUT:
                oldest = min(self._signed_out, key=self._signed_out.__getitem__)
                del self._signed_out[oldest]
            self._signed_out[session.nonce] = session.issued_at + self.max_age_s

    # -- CSRF -------------------------------------------------------------------------------------
    def csrf_token(self, session: Session) -> str:
        return _mac(self._csrf_key, "session", session.nonce)

    def csrf_ok(self, session: Session, candidate: str | None) -> bool:
        return bool(candidate) and _same(self.csrf_token(session), candidate or "")

    def login_challenge(self) -> tuple[str, str]:
        """A new sign-in form's pair: the ``nox_login`` cookie value and the form's token."""
        cookie = secrets.token_urlsafe(24)
        return cookie, _mac(self._csrf_key, "login", cookie)

    def login_ok(self, cookie: str | None, candidate: str | None) -> bool:
        if not cookie or not candidate or len(cookie) > 128:
            return False
        return _same(_mac(self._csrf_key, "login", cookie), candidate)


def load_or_create_secret(data_dir: Path) -> bytes:
    """The 32 bytes in ``data_dir/ui-session.key`` (64 hex characters), made with mode 0600 when
    missing; a new file is written aside and linked into place, so two processes starting at
    once agree on one key. A key file readable by others is chmod'ed to 0600."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read_key(path)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, secrets.token_bytes(32).hex().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        text = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(text) != 64 or text.strip(b"0123456789abcdef"):
        raise ValueError(f"{path} must hold 64 lowercase hex characters")
    return bytes.fromhex(text.decode("ascii"))
