"""Archive jobs end to end: real directories, a real SeaweedFS S3 server, real ext4 images, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import pytest
from archive_fixtures import S3Server, disk_image, ext4_image, receiver_with_archive, rewrite, write_password
from helpers import MiB, file_hash, free_port, run_cdp

from cdp.archive.backend import run_sync
from cdp.archive.job import file_opener, init_repo, open_repo, run_archive
from cdp.archive.maint import prune, verify
from cdp.archive.pack import PackWriter, encode_blob, pack_name
from cdp.config import KeepPolicy, load_receiver

CHUNK = 256 * 1024


@pytest.fixture(params=["dir", "s3"])
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str | None]:
    if request.param == "dir":
        return str(tmp_path / "repo"), None
    s3: S3Server = request.getfixturevalue("s3_env")
    return f"s3://cdp-test/{uuid.uuid4().hex}", s3.endpoint


def _objects(url: str, endpoint: str | None, prefix: str) -> dict[str, int]:
    from cdp.archive.backend import open_backend

    return {o.name: o.size for o in asyncio.run(open_backend(url, endpoint).ls(prefix))}


def _init(toml: Path) -> None:
    """Create the repository through the engine (the CLI's init is tested in the round trip)."""
    run_sync(init_repo(load_receiver(toml).archives[0]))


def _ok(r: object) -> None:
    assert getattr(r, "returncode", None) == 0, f"{r.stdout}\n{r.stderr}"  # type: ignore[attr-defined]


def test_round_trip_stores_only_changed_chunks(tmp_path: Path, repo_url: tuple[str, str | None]) -> None:
    url, endpoint = repo_url
    img = disk_image(tmp_path / "vol1.img", 8 * MiB, seed=7)
    with open(img, "r+b") as fh:  # a 1 MiB hole: whole zero chunks
        os.pwrite(fh.fileno(), bytes(MiB), 2 * MiB)
    toml = receiver_with_archive(tmp_path / "rx", url, endpoint=endpoint)
    cfg = load_receiver(toml)
    _ok(run_cdp("archive", "init", "-c", toml))
    opener = file_opener({"vol1": img})
    first = run_archive(cfg, "offsite", opener=opener)
    h1 = file_hash(img)
    v1 = first.volumes[0]
    assert v1.chunks == 32 and v1.zero_chunks == 4 and v1.new_chunks == 28
    packs1 = _objects(url, endpoint, "data/")
    assert len(packs1) == first.packs_uploaded >= 2

    changed = [0, 5 * MiB + 4096, 7 * MiB]  # inside three different chunks
    rewrite(img, changed, seed=8, length=4096)
    second = run_archive(cfg, "offsite", opener=opener)
    h2 = file_hash(img)
    v2 = second.volumes[0]
    assert (v2.new_chunks, v2.new_bytes) == (3, 3 * CHUNK)
    packs2 = _objects(url, endpoint, "data/")
    assert second.packs_uploaded == 1 and len(packs2) == len(packs1) + 1
    new_pack = (set(packs2) - set(packs1)).pop()
    assert packs2[new_pack] < 3 * CHUNK + 4096  # only the changed chunks went up
    assert second.bytes_uploaded == packs2[new_pack]

    for snap, want in ((first.snapshot, h1), (second.snapshot, h2)):
        out = tmp_path / f"restored-{snap[:8]}.img"
        _ok(run_cdp("archive", "restore", "-c", toml, snap[:10], "vol1", "--to", out))
        assert file_hash(out) == want
        assert os.stat(out).st_blocks * 512 <= 8 * MiB - MiB  # the zero chunks are holes
    r = run_cdp("archive", "list", "-c", toml, "--json")
    _ok(r)
    listed = json.loads(r.stdout)
    assert [s["snapshot"] for s in listed] == [first.snapshot, second.snapshot]
    r = run_cdp("archive", "verify", "-c", toml, "--read-data", "--json")
    _ok(r)
    assert json.loads(r.stdout)["chunks_read"] == 28 + 3


def test_unchanged_chunks_dedup_across_volumes_and_nothing_is_plaintext(tmp_path: Path) -> None:
    a = disk_image(tmp_path / "a.img", 4 * MiB, seed=3)
    b = tmp_path / "b.img"
    b.write_bytes(a.read_bytes())
    secret = b"PLAINTEXT-MARKER-" * 4000
    with open(a, "r+b") as fh:
        os.pwrite(fh.fileno(), secret[:CHUNK], 0)
    with open(b, "r+b") as fh:
        os.pwrite(fh.fileno(), secret[:CHUNK], 0)
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"), volumes=["a", "b"])
    _init(toml)
    rep = run_archive(load_receiver(toml), None, opener=file_opener({"a": a, "b": b}))
    va, vb = rep.volumes
    assert va.new_chunks == va.chunks - va.zero_chunks and vb.new_chunks == 0
    for p in (tmp_path / "repo").rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert b"PLAINTEXT-MARKER" not in data and b'"vol1"' not in data and b"hostname" not in data


FILES = {"etc/hostname": b"dr-host\n", "etc/libvirt/vm1.xml": b"<domain>vm1</domain>\n" * 50,
         "data/blob.bin": os.urandom(3 * MiB + 123)}


@pytest.mark.parametrize("table", [None, "gpt", "dos"])
def test_single_files_out_of_an_ext4_image(tmp_path: Path, table: str | None) -> None:
    img = ext4_image(tmp_path / "fs.img", FILES, 24 * MiB, partitioned=table)
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"), chunk_size="1MiB",
                                 pack_size="4MiB")
    _init(toml)
    rep = run_archive(load_receiver(toml), "offsite", opener=file_opener({"vol1": img}))
    snap = rep.snapshot[:8]
    r = run_cdp("archive", "ls", "-c", toml, snap, "vol1", "/etc", "--json")
    _ok(r)
    listing = json.loads(r.stdout)
    assert {e["name"]: e["type"] for e in listing["entries"]} == {"hostname": "file", "libvirt": "dir"}
    assert listing["partition"] == (1 if table else None)
    dest = tmp_path / "out"
    dest.mkdir()
    _ok(run_cdp("archive", "get", "-c", toml, snap, "vol1", "/data/blob.bin", "--to", dest))
    assert (dest / "blob.bin").read_bytes() == FILES["data/blob.bin"]
    if table == "dos":
        return  # the rest does not depend on the partition table
    r = run_cdp("archive", "ls", "-c", toml, snap, "vol1")
    _ok(r)
    assert "etc" in r.stdout and "data" in r.stdout
    _ok(run_cdp("archive", "get", "-c", toml, snap, "vol1", "etc", "--to", dest / "etc-copy"))
    assert (dest / "etc-copy" / "libvirt" / "vm1.xml").read_bytes() == FILES["etc/libvirt/vm1.xml"]
    assert (dest / "etc-copy" / "hostname").read_bytes() == b"dr-host\n"
    r = run_cdp("archive", "get", "-c", toml, snap, "vol1", "/nope", "--to", dest)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_file_reads_fetch_only_the_chunks_they_need(tmp_path: Path) -> None:
    from cdp.archive.files import list_path, open_fs
    from cdp.archive.restore import Portal, SnapshotImage

    img = ext4_image(tmp_path / "fs.img", FILES, 32 * MiB, partitioned="gpt")
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"), chunk_size="1MiB")
    cfg = load_receiver(toml)
    _init(toml)
    rep = run_archive(cfg, "offsite", opener=file_opener({"vol1": img}))
    with Portal() as portal:
        repo = portal.call(open_repo(cfg.archives[0]))
        portal.call(repo.load_index())
        snap = portal.call(repo.find_snapshot(rep.snapshot))
        image = SnapshotImage(repo, snap.volumes[0], portal, cache_chunks=4)
        fs, part = open_fs(image)  # type: ignore[arg-type]
        assert part == 1
        assert {e["name"] for e in list_path(fs, "/etc")} == {"hostname", "libvirt"}
        assert fs.get("/etc/hostname").open().read() == b"dr-host\n"
        stored = rep.volumes[0].chunks - rep.volumes[0].zero_chunks
        assert 0 < image.fetches < stored  # never the whole image


def test_verify_read_data_names_damaged_chunk_and_snapshots(tmp_path: Path) -> None:
    img = disk_image(tmp_path / "vol1.img", 4 * MiB, seed=11)
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"))
    cfg = load_receiver(toml)
    _init(toml)
    s1 = run_archive(cfg, "offsite", opener=file_opener({"vol1": img})).snapshot
    rewrite(img, [3 * MiB], seed=1)
    s2 = run_archive(cfg, "offsite", opener=file_opener({"vol1": img})).snapshot
    _ok(run_cdp("archive", "verify", "-c", toml))

    async def pick() -> tuple[bytes, str, int]:
        repo = await open_repo(cfg.archives[0])
        await repo.load_index()
        snap = await repo.find_snapshot(s1)
        cid = next(c for c in snap.volumes[0].ids()[:4] if c in repo.index)  # shared by s1 and s2
        e = repo.index[cid]
        return cid, e.pack, e.offset + e.length // 2

    cid, pk, off = asyncio.run(pick())
    path = tmp_path / "repo" / pack_name(pk)
    with open(path, "r+b") as fh:
        byte = os.pread(fh.fileno(), 1, off)
        os.pwrite(fh.fileno(), bytes([byte[0] ^ 0x10]), off)
    r = run_cdp("archive", "verify", "-c", toml)
    assert r.returncode == 0, "structure is intact; only --read-data reads the bytes"
    r = run_cdp("archive", "verify", "-c", toml, "--read-data")
    assert r.returncode == 1
    assert cid.hex() in r.stdout and s1[:8] in r.stdout and s2[:8] in r.stdout
    r = run_cdp("archive", "verify", "-c", toml, "--read-data", "--json")
    assert r.returncode == 1
    probs = json.loads(r.stdout)["problems"]
    damaged = [p for p in probs if p["kind"] == "damaged"]
    assert [p["chunk"] for p in damaged] == [cid.hex()]
    assert sorted(damaged[0]["snapshots"]) == sorted([s1[:8], s2[:8]])
    assert any(p["kind"] == "pack-hash" and p["pack"] == pk for p in probs)
    r = run_cdp("archive", "restore", "-c", toml, s2[:8], "vol1", "--to", tmp_path / "x.img")
    assert r.returncode == 1 and cid.hex() in r.stderr and not (tmp_path / "x.img").exists()


def test_prune_forgets_by_policy_and_collects_only_old_unreferenced_packs(tmp_path: Path) -> None:
    img = disk_image(tmp_path / "vol1.img", 4 * MiB, seed=5)
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"))
    cfg = load_receiver(toml)
    _init(toml)
    snaps = []
    for i in range(3):
        if i:
            rewrite(img, [0], seed=100 + i, length=CHUNK)  # runs 2 and 3 replace chunk 0: one pack each
        snaps.append(run_archive(cfg, "offsite", opener=file_opener({"vol1": img})).snapshot)
    final = file_hash(img)
    repo_dir = tmp_path / "repo"

    async def orphan() -> str:  # a pack of an interrupted run: no index, no snapshot names it
        repo = await open_repo(cfg.archives[0])
        w = PackWriter(repo.keys)
        data = os.urandom(1000)
        cid = repo.keys.chunk_id(data)
        w.add(cid, encode_blob(repo.keys, cid, data, 3), len(data))
        name, blob, _ = w.seal()
        await repo.backend.put(pack_name(name), blob)
        return name

    orphan_pack = asyncio.run(orphan())
    packs_before = {p.name for p in (repo_dir / "data").rglob("*") if p.is_file()}

    async def go(grace: float, now: float | None) -> dict:
        return await prune(await open_repo(cfg.archives[0]), KeepPolicy(last=1), grace=grace, now=now)

    r = run_cdp("archive", "prune", "-c", toml, "--dry-run", "--json")  # keep = {} in the config: all
    _ok(r)
    assert json.loads(r.stdout)["forgotten"] == [] and len(json.loads(r.stdout)["kept"]) == 3
    rep = asyncio.run(go(3600, None))  # packs are seconds old: inside the grace window
    assert rep["forgotten"] == snaps[:2] and [k["snapshot"] for k in rep["kept"]] == snaps[2:]
    assert rep["packs_deleted"] == []
    assert {p.name for p in (repo_dir / "data").rglob("*") if p.is_file()} == packs_before

    async def needed() -> tuple[set[str], set[str]]:
        repo = await open_repo(cfg.archives[0])
        await repo.load_index()
        (snap,) = await repo.snapshots()
        live = {repo.index[c].pack for c in snap.volumes[0].ids() if c in repo.index}
        return live, set(repo.pack_sizes)

    live, present = asyncio.run(needed())
    rep = asyncio.run(go(3600, __import__("time").time() + 7200))  # two hours later
    after = {p.name for p in (repo_dir / "data").rglob("*") if p.is_file()}
    assert after == live and set(rep["packs_deleted"]) == present - live
    assert len(rep["packs_deleted"]) == 2 and orphan_pack in rep["packs_deleted"]
    assert len(list((repo_dir / "index").iterdir())) == 1
    out = tmp_path / "latest.img"
    _ok(run_cdp("archive", "restore", "-c", toml, "latest", "vol1", "--to", out))
    assert file_hash(out) == final
    _ok(run_cdp("archive", "verify", "-c", toml, "--read-data"))
    assert asyncio.run(verify(asyncio.run(open_repo(cfg.archives[0])), True))["ok"]


def test_clear_exit_2_and_nothing_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cdptest")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cdptest-secret")
    img = disk_image(tmp_path / "vol1.img", 2 * MiB, seed=2)
    repo = tmp_path / "repo"
    toml = receiver_with_archive(tmp_path / "rx", str(repo))
    cfg = load_receiver(toml)
    # missing repository: exit 2, the directory is not created
    for verb in (["ls", "latest", "vol1"], ["restore", "latest", "vol1", "--to", tmp_path / "o"]):
        r = run_cdp("archive", *verb, "-c", toml)
        assert r.returncode == 2 and "no archive repository" in r.stderr and "cdp archive init" in r.stderr
        assert not repo.exists() and not (tmp_path / "o").exists()
    _init(toml)
    run_archive(cfg, "offsite", opener=file_opener({"vol1": img}))
    r = run_cdp("archive", "init", "-c", toml)
    assert r.returncode == 2 and "already" in r.stderr
    # wrong password: exit 2, nothing written (no lock, no output file)
    before = sorted((p.relative_to(repo), p.stat().st_mtime_ns) for p in repo.rglob("*"))
    write_password(tmp_path / "rx" / "archive.pass", "not the right password")
    for verb in (["prune"], ["run"], ["restore", "latest", "vol1", "--to", tmp_path / "o"]):
        r = run_cdp("archive", *verb, "-c", toml)
        assert r.returncode == 2 and "wrong password" in r.stderr, (verb, r.stderr)
    assert sorted((p.relative_to(repo), p.stat().st_mtime_ns) for p in repo.rglob("*")) == before
    assert not (tmp_path / "o").exists()
    # unreachable S3 endpoint: exit 2 quickly, a clear message
    toml2 = receiver_with_archive(tmp_path / "rx2", "s3://cdp-test/unreachable",
                                  endpoint=f"http://127.0.0.1:{free_port()}")
    for verb in (["init"], ["restore", "latest", "vol1", "--to", tmp_path / "o"]):
        r = run_cdp("archive", *verb, "-c", toml2, timeout=90)
        assert r.returncode == 2 and "cannot reach" in r.stderr, (verb, r.stderr)
    assert not (tmp_path / "o").exists()


def test_missing_s3_repository_exit_2_nothing_created(tmp_path: Path, s3_env: S3Server) -> None:
    toml3 = receiver_with_archive(tmp_path / "rx3", "s3://cdp-test/never-made", endpoint=s3_env.endpoint)
    r = run_cdp("archive", "run", "-c", toml3)
    assert r.returncode == 2 and "no archive repository" in r.stderr
    assert _objects("s3://cdp-test/never-made", s3_env.endpoint, "") == {}
    url = f"s3://cdp-test/{uuid.uuid4().hex}"
    toml4 = receiver_with_archive(tmp_path / "rx4", url, endpoint=s3_env.endpoint)
    _ok(run_cdp("archive", "init", "-c", toml4))
    before = _objects(url, s3_env.endpoint, "")
    assert set(before) == {"config", "key"}
    write_password(tmp_path / "rx4" / "archive.pass", "not the right password")
    r = run_cdp("archive", "run", "-c", toml4)
    assert r.returncode == 2 and "wrong password" in r.stderr
    assert _objects(url, s3_env.endpoint, "") == before


def test_prune_repacks_mostly_dead_packs(tmp_path: Path) -> None:
    img = disk_image(tmp_path / "vol1.img", 2 * MiB, seed=31)
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"), pack_size="4MiB",
                                 keep="{ last = 1 }")
    cfg = load_receiver(toml)
    _init(toml)
    first = run_archive(cfg, "offsite", opener=file_opener({"vol1": img}))
    assert first.packs_uploaded == 1  # all 8 chunks in one pack
    (old_pack,) = _objects(str(tmp_path / "repo"), None, "data/")
    rewrite(img, [i * CHUNK for i in range(1, 8)], seed=32, length=CHUNK)  # 7 of 8 chunks change
    run_archive(cfg, "offsite", opener=file_opener({"vol1": img}))
    want = file_hash(img)
    size_before = sum(_objects(str(tmp_path / "repo"), None, "data/").values())
    r = run_cdp("archive", "prune", "-c", toml, "--json")
    _ok(r)
    rep = json.loads(r.stdout)
    assert len(rep["forgotten"]) == 1 and rep["packs_repacked"] == [old_pack.rsplit("/", 1)[-1]]
    packs = _objects(str(tmp_path / "repo"), None, "data/")
    assert old_pack not in packs and len(packs) == 2
    assert sum(packs.values()) < size_before and rep["bytes_freed"] > 0
    _ok(run_cdp("archive", "verify", "-c", toml, "--read-data"))
    out = tmp_path / "out.img"
    _ok(run_cdp("archive", "restore", "-c", toml, "latest", "vol1", "--to", out))
    assert file_hash(out) == want
