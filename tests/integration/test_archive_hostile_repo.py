"""Whoever can write the archive bucket: what it must not achieve (issue 13, defects 2 and 10).

The attack as reported goes through the real CLI: the repository's config is
rewritten to say "not encrypted" (index/, snapshots/, locks/ moved aside) and
an unchanged `cdp archive run` with encrypt = true must fail before uploading
anything. The rest runs on the engine over a directory and the real S3 server
where the backend matters (object timestamps for lock ages).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import time
import uuid
from pathlib import Path

import msgpack
import pytest
from archive_fixtures import S3Server, receiver_with_archive
from helpers import run_cdp

from cdp.archive import crypto
from cdp.archive import lock as locks
from cdp.archive.backend import Backend, LocalBackend, ObjectTooLarge, open_backend
from cdp.archive.crypto import TamperedError
from cdp.archive.repo import PLAIN_PARAMS, Repository
from cdp.errors import ArchiveAccessError, ArchiveCorruptError, ArchiveLockedError

PW = b"a good long password"
MARKER = b"CLEAR-TEXT-MARKER-"


@pytest.fixture(params=["dir", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "dir":
        (tmp_path / "b").mkdir()
        return open_backend(f"file://{tmp_path / 'b'}")
    s3: S3Server = request.getfixturevalue("s3_env")
    return open_backend(f"s3://cdp-test/hostile-{uuid.uuid4().hex}", s3.endpoint)


def _edit(raw: bytes, **changes: object) -> bytes:
    d = msgpack.unpackb(raw, raw=False)
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    return msgpack.packb(d)


async def _legacy(backend: Backend) -> None:
    """Make a repository look as cdp wrote it before the config MAC: format 1, key file without id."""
    cfg = msgpack.unpackb(await backend.get("config"), raw=False)
    await backend.put("config", msgpack.packb({"v": 1, "id": cfg["id"], "encrypted": cfg["encrypted"],
                                               "created": cfg["created"]}))
    if await backend.exists("key"):
        await backend.put("key", _edit(await backend.get("key"), id=...))


# -- the reported attack, end to end through the CLI -----------------------------------------------


def _replica_with_marker(data_dir: Path) -> None:
    pytest.importorskip("cdp.replica.pointview", reason="the replica's point-in-time view is not built yet")
    from cdp.blocks import Geometry, pack_u64
    from cdp.codec import block_hash, compress
    from cdp.replica import Replica

    bs = 64 * 1024
    rng = random.Random(13)
    rep = Replica.open(data_dir, "vm1", Geometry(32 * bs, bs), create=True)
    try:
        blocks = {i: (MARKER * (bs // len(MARKER) + 1))[:bs] if i % 2 else rng.randbytes(bs)
                  for i in range(0, 32, 3)}
        w = rep.begin(1, time.time() - 10)
        idx = sorted(blocks)
        data = b"".join(blocks[i] for i in idx)
        w.add_data(pack_u64(idx), b"".join(block_hash(blocks[i]) for i in idx), len(data), compress(data))
        w.seal(w.blocks)
        w.apply()
    finally:
        rep.close()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("config_format", [2, 1])
def test_cli_run_refuses_a_config_switched_to_unencrypted(tmp_path: Path, config_format: int) -> None:
    repo = tmp_path / "repo"
    toml = receiver_with_archive(tmp_path / "rx", str(repo), volumes=["vm1"])
    _replica_with_marker(tmp_path / "rx" / "replicas")
    r = run_cdp("archive", "init", "-c", toml)
    assert r.returncode == 0, r.stderr
    if config_format == 1:  # a repository made by cdp before the MAC: still opens, is left as it is
        asyncio.run(_legacy(LocalBackend(repo)))
        legacy = (repo / "config").read_bytes()
        r = run_cdp("archive", "run", "-c", toml)
        assert r.returncode == 0, r.stderr
        assert (repo / "config").read_bytes() == legacy
    # the attack: the config says "not encrypted" (consistently so), what would not read is moved aside
    (repo / "config").write_bytes(_edit((repo / "config").read_bytes(), encrypted=False,
                                        params=PLAIN_PARAMS, mac=None))
    aside = tmp_path / "aside"
    aside.mkdir()
    for d in ("index", "snapshots", "locks"):
        if (repo / d).exists():
            shutil.move(repo / d, aside / d)
    before = _tree(repo)
    r = run_cdp("archive", "run", "-c", toml)
    assert r.returncode != 0, r.stdout
    assert "not encrypted" in r.stderr and "encrypt = true" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    after = _tree(repo)
    assert after == before  # nothing uploaded: no pack, index, snapshot or lock
    assert not any(MARKER in blob for blob in after.values())


# -- the config and key file are authenticated --------------------------------------------------


def test_unencrypted_config_refused_when_receiver_toml_expects_encryption(backend: Backend) -> None:
    async def go() -> None:
        await Repository.init(backend, PW, kdf_n=1 << 10)
        good = await backend.get("config")
        await backend.put("config", _edit(good, encrypted=False))
        with pytest.raises(TamperedError, match="not encrypted"):
            await Repository.open(backend, PW)
        await _legacy(backend)  # format 1 said "encrypted": false as the reported attack did
        with pytest.raises(TamperedError, match="not encrypted"):
            await Repository.open(backend, PW)
        assert {o.name for o in await backend.ls("")} == {"config", "key"}  # nothing written

    asyncio.run(go())


def test_config_fields_are_bound_by_the_mac(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "r")

    async def go() -> None:
        await Repository.init(backend, PW, kdf_n=1 << 10)
        good = await backend.get("config")
        assert (await Repository.open(backend, PW)).keys.encrypted
        for change in ({"params": {**PLAIN_PARAMS, "cipher": "aes-256-gcm"}},  # unkeyed chunk ids
                       {"params": {"cipher": "aes-256-gcm", "ids": "hmac-sha256-xxh3-128", "pack": 0}},
                       {"created": 1.0}, {"mac": ...}, {"mac": bytes(32)}):
            await backend.put("config", _edit(good, **change))
            with pytest.raises(TamperedError, match="does not authenticate"):
                await Repository.open(backend, PW)
        await backend.put("config", _edit(good, id=uuid.uuid4().hex))  # another repository's id
        with pytest.raises(TamperedError, match="belongs to repository"):
            await Repository.open(backend, PW)
        await backend.put("config", _edit(good, v=3))
        with pytest.raises(ArchiveAccessError, match="upgrade cdp"):
            await Repository.open(backend, PW)
        await backend.put("config", good + bytes(8000))  # never read whole into memory
        with pytest.raises(ObjectTooLarge):
            await Repository.open(backend, PW)
        await backend.put("config", good)
        assert (await Repository.open(backend, PW)).keys.encrypted

    asyncio.run(go())


def test_legacy_repository_opens_unchanged(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "r")

    async def go() -> None:
        made = await Repository.init(backend, PW, kdf_n=1 << 10)
        await _legacy(backend)
        before = _tree(tmp_path / "r")
        opened = await Repository.open(backend, PW)
        assert opened.keys == made.keys and opened.id == made.id
        with pytest.raises(ArchiveAccessError, match="wrong password"):
            await Repository.open(backend, b"not the password")
        assert _tree(tmp_path / "r") == before
        plain = LocalBackend(tmp_path / "plain")  # encrypt = false repositories stay readable too
        await Repository.init(plain, None)
        await _legacy(plain)
        assert not (await Repository.open(plain, None)).keys.encrypted

    asyncio.run(go())


def test_init_never_overwrites_a_key(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "r")

    async def go() -> None:
        await Repository.init(backend, PW, kdf_n=1 << 10)
        key = await backend.get("key")
        await backend.delete("config")  # lost, or deleted by a bucket writer
        with pytest.raises(ArchiveAccessError, match="key file is there"):
            await Repository.init(backend, PW, kdf_n=1 << 10)
        assert await backend.get("key") == key

    asyncio.run(go())


# -- key file: scrypt parameters are bounded before scrypt runs -------------------------------------


@pytest.mark.parametrize(("n", "r", "p"), [(1 << 22, 32, 16), (1 << 20, 8, 1), (1 << 15, 8, 16),
                                           (3000, 8, 1), (1 << 62, 8, 1)])
def test_key_file_kdf_parameters_above_the_cap_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            n: int, r: int, p: int) -> None:
    backend = LocalBackend(tmp_path / "r")

    async def go() -> None:
        await Repository.init(backend, PW, kdf_n=1 << 10)
        await backend.put("key", _edit(await backend.get("key"), n=n, r=r, p=p))

        def scrypt(*_: object) -> bytes:
            raise AssertionError(f"scrypt ran with n={n} r={r} p={p}")

        monkeypatch.setattr(crypto, "_scrypt", scrypt)
        with pytest.raises(ArchiveCorruptError, match="key file is unreadable: scrypt parameters"):
            await Repository.open(backend, PW)

    asyncio.run(go())


def test_init_writes_kdf_parameters_well_inside_the_cap() -> None:
    n, r, p = crypto.SCRYPT_N, crypto.SCRYPT_R, crypto.SCRYPT_P
    crypto.check_kdf(n, r, p)
    assert 128 * n * r * 4 <= crypto.KDF_MAX_MEMORY and n * r * p * 4 <= crypto.KDF_MAX_WORK
    with pytest.raises(ArchiveAccessError, match="more than cdp allows"):
        crypto.new_key_file(PW, "x", n=1 << 20)  # never write a key file that open would refuse


# -- lock ages are the backend's, never the holder's -------------------------------------------------


def _lock_body(repo: Repository, claimed: float, host: str = "elsewhere") -> bytes:
    body = msgpack.packb({"host": host, "pid": 1, "time": claimed, "exclusive": True})
    return repo.keys.seal(body, locks.AAD)


def test_lock_claiming_far_past_or_far_future(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        repo = await Repository.init(backend, PW, kdf_n=1 << 10)
        # a live holder whose clock is a day behind: its lock was just written, so it holds
        await backend.put("locks/lagging", _lock_body(repo, time.time() - 86400))
        with pytest.raises(ArchiveLockedError, match="elsewhere"):
            await locks.lock(repo, exclusive=True)
        assert await backend.exists("locks/lagging")
        await backend.delete("locks/lagging")
        # a lock claiming a time ten years ahead, not rewritten for longer than STALE_AFTER: stale
        await backend.put("locks/ahead", _lock_body(repo, time.time() + 10 * 365 * 86400))
        if isinstance(backend, LocalBackend):
            old = time.time() - 2 * locks.STALE_AFTER
            os.utime(backend.root / "locks" / "ahead", (old, old))
        else:  # S3 stamps objects itself: let the lock age past a short STALE_AFTER instead
            monkeypatch.setattr(locks, "STALE_AFTER", 1.0)
            await asyncio.sleep(2.2)
        held = await locks.lock(repo, exclusive=True)
        assert {o.name for o in await backend.ls("locks/")} == {held.name}
        await held.release()

    asyncio.run(go())


def test_lock_modified_in_the_far_future_is_stale(tmp_path: Path) -> None:
    """Only a directory lets a writer set an object's time; a time the backend never gave is ignored."""
    backend = LocalBackend(tmp_path / "r")

    async def go() -> None:
        repo = await Repository.init(backend, PW, kdf_n=1 << 10)
        await backend.put("locks/future", _lock_body(repo, time.time(), host=socket.gethostname() + "x"))
        ahead = time.time() + 10 * 365 * 86400
        os.utime(backend.root / "locks" / "future", (ahead, ahead))
        held = await locks.lock(repo, exclusive=True)
        assert {o.name for o in await backend.ls("locks/")} == {held.name}
        await held.release()
        await backend.put("locks/huge", bytes(1 << 20))  # unreadable and oversized: live until stale
        with pytest.raises(ArchiveLockedError, match=r"exclusive lock of pid 0 on \?"):
            await locks.lock(repo, exclusive=False)

    asyncio.run(go())


def test_replaced_objects_are_not_read_whole_into_memory(tmp_path: Path) -> None:
    """A sparse 2 GiB index file or pack (a directory makes them cheap) is refused from its size."""
    from cdp.archive.maint import verify
    from cdp.archive.pack import PackWriter, encode_blob, pack_name

    backend = LocalBackend(tmp_path / "r")

    async def go() -> None:
        repo = await Repository.init(backend, PW, kdf_n=1 << 10)
        w = PackWriter(repo.keys)
        chunk = os.urandom(1000)
        cid = repo.keys.chunk_id(chunk)
        w.add(cid, encode_blob(repo.keys, cid, chunk, 3), len(chunk))
        name, data, entries = w.seal()
        await repo.put_pack(name, data, entries)
        await repo.write_index([name])
        with open(backend.root / pack_name(name), "r+b") as fh:
            fh.truncate(2 << 30)
        report = await verify(await Repository.open(backend, PW), read_data=True)
        assert [p["message"] for p in report["problems"] if p["kind"] == "damaged"] == [
            f"chunk {cid.hex()} in pack {name[:8]}: pack is larger than cdp writes"]
        with open(backend.root / "index" / ("f" * 64), "wb") as fh:
            fh.truncate(2 << 30)
        with pytest.raises(ObjectTooLarge):
            await (await Repository.open(backend, PW)).load_index()

    asyncio.run(go())
