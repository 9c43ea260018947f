"""The encrypted backup file: a header, then AES-256-GCM chunks of a zstd-compressed stream.

::

    file   = header chunk* final-chunk
    header = b"NOXBAK" version:u8 length:u16 json          (json: canonical, UTF-8)
    chunk  = length:u32 ciphertext                         (plaintext + 16-byte tag)

The header's JSON names the KDF and its parameters, the salt, the random nonce prefix, the chunk
size, the compression and the creation time. The file key is derived per file: HKDF-SHA256 of
``NOX_BACKUP_KEY`` with the salt, or scrypt of ``NOX_BACKUP_PASSPHRASE`` with the salt, so two
files never share a key even under one configured key. Chunk ``i`` is sealed with the nonce
``prefix(4) || i(8)`` and the associated data ``header || i(8) || final(1)``: the header is
authenticated by every chunk, a chunk moved, dropped or repeated fails, and only the last chunk
is marked final, so a file cut anywhere (even at a chunk boundary) is detected. Every chunk is
authenticated before a byte of it is handed on.

The plaintext is one zstd frame (level 3; zstd stores blocks it cannot shrink as they are, so
random data costs little) of a tar stream, see :mod:`nox_api.services.backup_archive`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, Protocol, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from nox_api.config import Settings
from nox_api.errors import InvalidRequest

__all__ = [
    "BackupFormatError",
    "ChunkReader",
    "ChunkWriter",
    "FORMAT_VERSION",
    "KeyMaterial",
    "MAGIC",
    "key_material",
    "read_header",
]

MAGIC = b"NOXBAK"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 16 << 20
MAX_HEADER_BYTES = 4096
TAG_BYTES = 16
SALT_BYTES = 16
NONCE_PREFIX_BYTES = 4
SCRYPT_N = 1 << 17  # 128 MiB and about 0.4 s here: memory-hard, and once per backup
SCRYPT_N_RANGE = (1 << 15, 1 << 17)
SCRYPT_R = 8
SCRYPT_P = 1
MIN_PASSPHRASE_CHARS = 12
_HKDF_INFO = b"nox-backup v1 file key"
_PREFIX = struct.Struct(">6sBH")  # magic, version, JSON length
_LENGTH = struct.Struct(">I")
_INDEX = struct.Struct(">Q")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_KEY_HELP = (
    "set NOX_BACKUP_KEY (64 hex characters, for example from `openssl rand -hex 32`) or "
    "NOX_BACKUP_PASSPHRASE (12 or more characters)"
)


class BackupFormatError(InvalidRequest):
    """The file is not a Nox backup, or it is damaged, truncated or under another key."""


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """What the configuration gives: a 32-byte key, a passphrase, or both."""

    key: bytes | None
    passphrase: bytes | None

    def new_kdf(self) -> tuple[dict[str, object], bytes]:
        """KDF parameters of a new file (its header's ``kdf``) and the file key."""
        salt = os.urandom(SALT_BYTES)
        if self.key is not None:
            params: dict[str, object] = {"name": "hkdf-sha256", "salt": salt.hex()}
        else:
            params = {"name": "scrypt", "salt": salt.hex(), "n": SCRYPT_N, "r": SCRYPT_R,
                      "p": SCRYPT_P}  # fmt: skip
        return params, self.derive(params)

    def derive(self, params: dict[str, object]) -> bytes:
        """The file key for a header's ``kdf``; BackupFormatError if it cannot be made."""
        name = params.get("name")
        salt = _hex_field(params, "salt", SALT_BYTES)
        if name == "hkdf-sha256":
            if self.key is None:
                raise BackupFormatError(
                    "this backup was encrypted with a key (NOX_BACKUP_KEY), which is not set"
                )
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HKDF_INFO)
            return hkdf.derive(self.key)
        if name == "scrypt":
            if self.passphrase is None:
                raise BackupFormatError(
                    "this backup was encrypted with a passphrase (NOX_BACKUP_PASSPHRASE), "
                    "which is not set"
                )
            n, r, p = (params.get(k) for k in ("n", "r", "p"))
            low, high = SCRYPT_N_RANGE
            if not (isinstance(n, int) and low <= n <= high and n & (n - 1) == 0) or (r, p) != (
                SCRYPT_R,
                SCRYPT_P,
            ):
                raise BackupFormatError(f"unsupported scrypt parameters n={n} r={r} p={p}")
            return Scrypt(salt=salt, length=32, n=n, r=SCRYPT_R, p=SCRYPT_P).derive(self.passphrase)
        raise BackupFormatError(f"unknown key derivation {name!r}")


def key_material(settings: Settings) -> KeyMaterial:
    """The backup key from the settings; InvalidRequest naming the variables without one."""
    key = None
    passphrase = None
    if settings.backup_key is not None:
        text = settings.backup_key.get_secret_value().strip()
        if not _HEX64.fullmatch(text):
            raise InvalidRequest("NOX_BACKUP_KEY must be 64 hex characters (32 bytes)")
        key = bytes.fromhex(text)
    if settings.backup_passphrase is not None:
        phrase = settings.backup_passphrase.get_secret_value()
        if len(phrase) < MIN_PASSPHRASE_CHARS:
            raise InvalidRequest(
                f"NOX_BACKUP_PASSPHRASE must be at least {MIN_PASSPHRASE_CHARS} characters"
            )
        passphrase = phrase.encode()
    if key is None and passphrase is None:
        raise InvalidRequest(f"no backup key is configured: {_KEY_HELP}")
    return KeyMaterial(key, passphrase)


def _hex_field(params: dict[str, object], name: str, size: int) -> bytes:
    value = params.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise BackupFormatError(f"the backup header's {name} is not {size} hex-encoded bytes")
    return raw


def _read_exactly(source: BinaryIO, size: int) -> bytes:
    data = source.read(size)
    while data is not None and len(data) < size:
        more = source.read(size - len(data))
        if not more:
            break
        data += more
    return data or b""


class _ReadsInto(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def _read_into(source: _ReadsInto, view: memoryview) -> int:
    """Fill ``view`` from ``source``; the bytes read (fewer only at its end)."""
    done = 0
    while done < len(view):
        got = source.readinto(view[done:])
        if not got:
            break
        done += got
    return done


def read_header(source: BinaryIO) -> tuple[bytes, dict[str, object]]:
    """The raw header (the chunks' associated data) and its fields; checks magic and version."""
    prefix = _read_exactly(source, _PREFIX.size)
    if len(prefix) < _PREFIX.size or prefix[: len(MAGIC)] != MAGIC:
        raise BackupFormatError("not a Nox backup (the file does not start with NOXBAK)")
    _magic, version, length = _PREFIX.unpack(prefix)
    if version != FORMAT_VERSION:
        raise BackupFormatError(
            f"backup format version {version} is not supported (this Nox reads {FORMAT_VERSION})"
        )
    if length > MAX_HEADER_BYTES:
        raise BackupFormatError("the backup header is too large")
    body = _read_exactly(source, length)
    if len(body) < length:
        raise BackupFormatError("the backup is truncated (its header is incomplete)")
    try:
        fields = json.loads(body)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        raise BackupFormatError("the backup header is not a JSON object")
    return prefix + body, fields


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + _INDEX.pack(index) + (b"\x01" if final else b"\x00")


class ChunkWriter:
    """A write-only stream that seals what it is given into ``out`` chunk by chunk. Call
    :meth:`finish` at the end (it writes the final chunk); ``size`` and ``sha256`` describe
    every byte written to ``out``, header included. The plaintext and the sealed chunk each
    go through one buffer, reused from chunk to chunk: nothing is allocated per chunk."""

    def __init__(self, out: BinaryIO, keys: KeyMaterial, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._out = out
        self._chunk = chunk_bytes
        kdf, file_key = keys.new_kdf()
        self._prefix = os.urandom(NONCE_PREFIX_BYTES)
        self.created_at = datetime.now(UTC)
        fields = {
            "chunk_bytes": chunk_bytes,
            "compression": "zstd",
            "content": "tar",
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
            "kdf": kdf,
            "nonce_prefix": self._prefix.hex(),
        }
        body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        self._header = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + body
        self._aead = AESGCM(file_key)
        self._plain = bytearray(chunk_bytes)
        self._used = 0
        self._sealed = bytearray(_LENGTH.size + chunk_bytes + TAG_BYTES)
        self._index = 0
        self._hash = hashlib.sha256()
        self.size = 0
        self._emit(self._header)
        self.finished = False

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.finished:
            raise ValueError("write after finish")
        with memoryview(data) as given:
            view = given.cast("B")
            size = len(view)
            while view:
                # Sealed only once more data follows: the last chunk, sealed as final, may be
                # a full one.
                if self._used == self._chunk:
                    self._seal(final=False)
                step = min(len(view), self._chunk - self._used)
                self._plain[self._used : self._used + step] = view[:step]
                self._used += step
                view = view[step:]
        return size

    def flush(self) -> None:
        return None

    def finish(self) -> None:
        """Seal the rest as the final chunk (empty when nothing is left)."""
        if not self.finished:
            self._seal(final=True)
            self.finished = True

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _seal(self, *, final: bool) -> None:
        nonce = self._prefix + _INDEX.pack(self._index)
        length = self._used + TAG_BYTES
        _LENGTH.pack_into(self._sealed, 0, length)
        with memoryview(self._plain) as plain, memoryview(self._sealed) as sealed:
            self._aead.encrypt_into(
                nonce,
                plain[: self._used],
                _aad(self._header, self._index, final),
                sealed[_LENGTH.size : _LENGTH.size + length],
            )
            self._emit(sealed[: _LENGTH.size + length])
        self._index += 1
        self._used = 0

    def _emit(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        self._hash.update(data)
        self.size += len(data)


class ChunkReader:
    """A read-only stream of the authenticated plaintext of a backup file. A wrong key or a
    damaged, truncated or extended file raises :class:`BackupFormatError` before any byte of the
    bad chunk is returned."""

    def __init__(self, source: BinaryIO, keys: KeyMaterial) -> None:
        self._source = source
        self._header, self.fields = read_header(source)
        chunk = self.fields.get("chunk_bytes")
        if not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK_BYTES:
            raise BackupFormatError("the backup header has no valid chunk size")
        if self.fields.get("compression") != "zstd" or self.fields.get("content") != "tar":
            raise BackupFormatError("the backup header names an unknown compression or content")
        kdf = self.fields.get("kdf")
        if not isinstance(kdf, dict):
            raise BackupFormatError("the backup header has no key derivation")
        self._prefix = _hex_field(self.fields, "nonce_prefix", NONCE_PREFIX_BYTES)
        self._max_sealed = chunk + TAG_BYTES
        self._aead = AESGCM(keys.derive(kdf))
        self._sealed = bytearray(self._max_sealed)  # reused from chunk to chunk
        self._index = 0
        self._plain = b""
        self._offset = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._plain[self._offset :]]
            self._plain, self._offset = b"", 0
            while self._next_chunk():
                parts.append(self._plain)
            self._plain = b""
            return b"".join(parts)
        while self._offset >= len(self._plain):
            if not self._next_chunk():
                return b""
        out = self._plain[self._offset : self._offset + size]
        self._offset += len(out)
        return out

    def _next_chunk(self) -> bool:
        """Authenticate the next chunk into the buffer; False at the end of the stream."""
        if self._done:
            return False
        index = self._index
        length_bytes = _read_exactly(self._source, _LENGTH.size)
        if not length_bytes:
            raise BackupFormatError(
                f"the backup is truncated: it ends after chunk {index - 1} without its final chunk"
            )
        if len(length_bytes) < _LENGTH.size:
            raise BackupFormatError(f"the backup is truncated inside chunk {index}")
        (length,) = _LENGTH.unpack(length_bytes)
        if not TAG_BYTES <= length <= self._max_sealed:
            raise self._bad(index, f"chunk {index} has an impossible length {length}")
        nonce = self._prefix + _INDEX.pack(index)
        plain = None
        final = False
        with memoryview(self._sealed) as whole:
            sealed = whole[:length]
            if _read_into(cast(_ReadsInto, self._source), sealed) < length:
                raise BackupFormatError(f"the backup is truncated inside chunk {index}")
            for final in (False, True):
                try:
                    plain = self._aead.decrypt(nonce, sealed, _aad(self._header, index, final))
                    break
                except InvalidTag:
                    continue
            sealed.release()
        if plain is None:
            raise self._bad(index, f"chunk {index} does not authenticate")
        self._index += 1
        self._plain, self._offset = plain, 0
        if final:
            self._done = True
            if self._source.read(1):
                raise BackupFormatError(
                    f"the backup is damaged: data follows its final chunk {index}"
                )
        return True

    @staticmethod
    def _bad(index: int, what: str) -> BackupFormatError:
        if index == 0:
            return BackupFormatError(f"wrong key or corrupted backup: {what}")
        return BackupFormatError(f"corrupted backup: {what}")
