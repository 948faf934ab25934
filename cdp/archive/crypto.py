"""Keys, sealing and chunk ids of an archive repository.

Key hierarchy::

    password --scrypt(salt, n, r, p)--> key-encryption key (32 B)
    key-encryption key --AES-256-GCM--> master key (32 random bytes), stored wrapped in `key`
    master key --HKDF-SHA256("cdp-archive enc")--> data key: AES-256-GCM for blobs, index, manifests
    master key --HKDF-SHA256("cdp-archive id")-->  id key: chunk id = HMAC-SHA256(id key, xxh3-128)[:16]

Changing the password rewraps the master key only; nothing else changes.
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
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password)


def _hkdf(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


@dataclass(frozen=True)
class Keys:
    """What a repository needs to seal and to name chunks; `None` keys mean unencrypted."""

    data: bytes | None
    ident: bytes | None

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


PLAIN = Keys(None, None)


def new_key_file(password: bytes, repo_id: str, *, n: int = SCRYPT_N) -> tuple[bytes, Keys]:
    """A fresh random master key wrapped with `password`: (key file bytes, keys)."""
    master = os.urandom(32)
    salt = os.urandom(16)
    kek = _scrypt(password, salt, n, SCRYPT_R, SCRYPT_P)
    nonce = os.urandom(NONCE_LEN)
    wrapped = AESGCM(kek).encrypt(nonce, master, b"cdp-archive key " + repo_id.encode())
    blob = msgpack.packb({"v": 1, "kdf": "scrypt", "n": n, "r": SCRYPT_R, "p": SCRYPT_P,
                          "salt": salt, "nonce": nonce, "wrapped": wrapped, "cipher": "aes-256-gcm"})
    return blob, derive(master)


def derive(master: bytes) -> Keys:
    return Keys(_hkdf(master, b"cdp-archive enc"), _hkdf(master, b"cdp-archive id"))


def unlock(key_file: bytes, password: bytes, repo_id: str, where: str) -> Keys:
    """The repository keys from its key file; a wrong password raises ArchiveAccessError."""
    try:
        k = msgpack.unpackb(key_file, raw=False, max_bin_len=1024, max_str_len=1024)
        if k.get("kdf") != "scrypt" or k.get("v") != 1:
            raise ValueError(f"unsupported key format {k.get('kdf')!r}")
        n, r, p = int(k["n"]), int(k["r"]), int(k["p"])
        if not (2 <= n <= 1 << 22 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError("key derivation parameters out of range")
        kek = _scrypt(password, k["salt"], n, r, p)
        nonce, wrapped = k["nonce"], k["wrapped"]
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise ArchiveCorruptError(f"{where}: key file is unreadable: {exc}") from None
    try:
        master = AESGCM(kek).decrypt(nonce, wrapped, b"cdp-archive key " + repo_id.encode())
    except InvalidTag:
        raise ArchiveAccessError(f"{where}: wrong password: the key file does not open with the "
                                 "password in password_file; check the file") from None
    return derive(master)
