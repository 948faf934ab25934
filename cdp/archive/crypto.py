"""Keys, sealing and chunk ids of an archive repository.

Key hierarchy::

    password --scrypt(salt, n, r, p)--> key-encryption key (32 B)
    key-encryption key --AES-256-GCM--> master key (32 random bytes), stored wrapped in `key`
    master key --HKDF-SHA256("cdp-archive enc")--> data key: AES-256-GCM for blobs, index, manifests
    master key --HKDF-SHA256("cdp-archive id")-->  id key: chunk id = HMAC-SHA256(id key, xxh3-128)[:16]
    master key --HKDF-SHA256("cdp-archive config")--> config key: HMAC-SHA256 over the repository config

Key file ``key`` (msgpack map; the repository's bucket is not trusted, so
every field is type- and range-checked before use)::

    v 1, kdf "scrypt", cipher "aes-256-gcm", id (repository id; absent in
    old key files), n r p salt (16-64 B), nonce (12 B), wrapped (48 B:
    AES-256-GCM of the master key, aad b"cdp-archive key " + repository id)

The scrypt parameters come from that unauthenticated file, so they are
bounded (KDF_MAX_MEMORY, KDF_MAX_WORK) before scrypt runs: a bucket writer
cannot make an open allocate gigabytes. Weak parameters gain it nothing: only
a key file wrapped with the password unwraps, and cdp never rewraps with
parameters it read. Changing the password rewraps the master key only.
Keyed ids mean the repository does not reveal which content it holds (an
unkeyed hash would confirm guesses). Sealed objects are
``nonce (12) | ciphertext | tag (16)`` with a purpose-specific associated
data, so a blob cannot be passed off as an index or as another chunk.
An unencrypted repository (``encrypt = false``) uses the plain xxh3-128 as
id and stores objects as they are.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

import msgpack
import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from cdp.errors import ArchiveAccessError, ArchiveCorruptError

ID_LEN = 16
ZERO_ID = bytes(ID_LEN)  # marker for an all-zero chunk: never stored
NONCE_LEN = 12
TAG_LEN = 16
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1  # 32 MiB, ~0.1 s: 1/8 of both caps below
KDF_MAX_MEMORY = 256 << 20  # scrypt needs 128 * n * r bytes
KDF_MAX_WORK = 1 << 21  # n * r * p: 8x the default's time
KEY_FILE_MAX = 1024  # a key file is ~200 bytes


class TamperedError(ArchiveCorruptError):
    """Repository metadata contradicts receiver.toml or the key: someone who can write it altered it."""


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password)


def _hkdf(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


def check_kdf(n: int, r: int, p: int) -> None:
    """Refuse scrypt parameters outside the caps (ValueError naming the limit)."""
    if n < 2 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError(f"scrypt parameters n={n} r={r} p={p} are malformed (n a power of two, "
                         "r 1-32, p 1-16)")
    if 128 * n * r > KDF_MAX_MEMORY or n * r * p > KDF_MAX_WORK:
        raise ValueError(f"scrypt parameters n={n} r={r} p={p} need {128 * n * r >> 20} MiB and "
                         f"{n * r * p} units of work, more than cdp allows ({KDF_MAX_MEMORY >> 20} MiB, "
                         f"{KDF_MAX_WORK}); cdp never writes such a key file")


@dataclass(frozen=True)
class Keys:
    """What a repository needs to seal, to name chunks and to authenticate its config.

    `None` keys mean unencrypted.
    """

    data: bytes | None
    ident: bytes | None
    auth: bytes | None = None

    @property
    def encrypted(self) -> bool:
        return self.data is not None

    def chunk_id(self, chunk: bytes | memoryview) -> bytes:
        """The content address of a chunk (keyed when encrypted)."""
        digest = xxhash.xxh3_128_digest(chunk)
        if self.ident is None:
            return digest
        return hmac.new(self.ident, digest, hashlib.sha256).digest()[:ID_LEN]

    def seal(self, data: bytes, aad: bytes) -> bytes:
        if self.data is None:
            return data
        nonce = os.urandom(NONCE_LEN)
        return nonce + AESGCM(self.data).encrypt(nonce, data, aad)

    def open(self, blob: bytes | memoryview, aad: bytes, what: str) -> bytes:
        """Inverse of seal; a tampered or damaged object raises ArchiveCorruptError."""
        if self.data is None:
            return bytes(blob)
        if len(blob) < NONCE_LEN + TAG_LEN:
            raise ArchiveCorruptError(f"{what} is truncated ({len(blob)} bytes)")
        try:
            return AESGCM(self.data).decrypt(bytes(blob[:NONCE_LEN]), bytes(blob[NONCE_LEN:]), aad)
        except InvalidTag:
            raise ArchiveCorruptError(f"{what} does not authenticate: it is damaged or was "
                                      "altered") from None

    def mac(self, body: bytes) -> bytes:
        """HMAC-SHA256 of the repository config's canonical bytes (encrypted repositories only)."""
        if self.auth is None:
            raise ValueError("an unencrypted repository has no config key")
        return hmac.new(self.auth, body, hashlib.sha256).digest()


PLAIN = Keys(None, None, None)


@dataclass(frozen=True)
class KeyFile:
    """A parsed, range-checked key file; nothing in it is trusted until `wrapped` opens."""

    n: int
    r: int
    p: int
    salt: bytes
    nonce: bytes
    wrapped: bytes
    repo_id: str | None  # None in key files written before cdp recorded it


def _aad(repo_id: str) -> bytes:
    return b"cdp-archive key " + repo_id.encode()


def new_key_file(password: bytes, repo_id: str, *, n: int = SCRYPT_N) -> tuple[bytes, Keys]:
    """A fresh random master key wrapped with `password`: (key file bytes, keys)."""
    try:
        check_kdf(n, SCRYPT_R, SCRYPT_P)
    except ValueError as exc:
        raise ArchiveAccessError(f"cannot create the key: {exc}") from None
    master = os.urandom(32)
    salt = os.urandom(16)
    kek = _scrypt(password, salt, n, SCRYPT_R, SCRYPT_P)
    nonce = os.urandom(NONCE_LEN)
    wrapped = AESGCM(kek).encrypt(nonce, master, _aad(repo_id))
    blob = msgpack.packb({"v": 1, "kdf": "scrypt", "n": n, "r": SCRYPT_R, "p": SCRYPT_P,
                          "salt": salt, "nonce": nonce, "wrapped": wrapped, "cipher": "aes-256-gcm",
                          "id": repo_id})
    return blob, derive(master)


def derive(master: bytes) -> Keys:
    return Keys(_hkdf(master, b"cdp-archive enc"), _hkdf(master, b"cdp-archive id"),
                _hkdf(master, b"cdp-archive config"))


def _int(k: dict[str, object], name: str) -> int:
    v = k.get(name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{name} is not an integer")
    return v


def _bin(k: dict[str, object], name: str, lo: int, hi: int) -> bytes:
    v = k.get(name)
    if not isinstance(v, bytes) or not lo <= len(v) <= hi:
        raise ValueError(f"{name} is not {lo}-{hi} bytes")
    return v


def parse_key_file(raw: bytes, where: str) -> KeyFile:
    """A key file's fields, each checked; anything else raises ArchiveCorruptError."""
    try:
        if len(raw) > KEY_FILE_MAX:
            raise ValueError(f"{len(raw)} bytes, more than a key file can be")
        k = msgpack.unpackb(raw, raw=False, max_bin_len=KEY_FILE_MAX, max_str_len=KEY_FILE_MAX)
        if not isinstance(k, dict):
            raise ValueError("not a map")
        if k.get("kdf") != "scrypt" or k.get("v") != 1 or k.get("cipher", "aes-256-gcm") != "aes-256-gcm":
            raise ValueError(f"unsupported key format {k.get('kdf')!r}")
        n, r, p = _int(k, "n"), _int(k, "r"), _int(k, "p")
        check_kdf(n, r, p)
        repo_id = k.get("id")
        if repo_id is not None and not isinstance(repo_id, str):
            raise ValueError("id is not a string")
        return KeyFile(n, r, p, _bin(k, "salt", 16, 64), _bin(k, "nonce", NONCE_LEN, NONCE_LEN),
                       _bin(k, "wrapped", 32 + TAG_LEN, 32 + TAG_LEN), repo_id)
    except (ValueError, TypeError, KeyError, OverflowError, msgpack.UnpackException) as exc:
        raise ArchiveCorruptError(f"{where}: key file is unreadable: {exc}; restore `key` from "
                                  "your copy of it") from None


def unlock(key_file: bytes, password: bytes, repo_id: str, where: str) -> Keys:
    """The repository keys from its key file; a wrong password raises ArchiveAccessError."""
    k = parse_key_file(key_file, where)
    if k.repo_id is not None and k.repo_id != repo_id:
        raise TamperedError(f"{where}: the key file belongs to repository {k.repo_id[:40]!r}, the config "
                            f"says {repo_id!r}: one of them was replaced; nothing was written")
    kek = _scrypt(password, k.salt, k.n, k.r, k.p)
    try:
        master = AESGCM(kek).decrypt(k.nonce, k.wrapped, _aad(repo_id))
    except InvalidTag:
        raise ArchiveAccessError(f"{where}: wrong password: the key file does not open with the "
                                 "password in password_file; check the file") from None
    return derive(master)
