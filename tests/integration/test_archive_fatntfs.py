"""`cdp archive ls|get` on FAT12/16/32 and NTFS images: bare, in MBR and GPT partitions, next to ext4.

Images are real: mkfs.vfat + mtools (mmd, mcopy) for FAT, mkntfs + ntfscp for
NTFS, nothing mounted. ntfscp cannot make directories, so the NTFS files sit in
the root, plus one in the existing system directory $Extend to read a path
below the root. Each image is archived through the engine into a directory
repository and read back with the CLI.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from archive_fixtures import ext4_image, receiver_with_archive
from helpers import MiB, run_cdp

from cdp.archive.backend import run_sync
from cdp.archive.job import file_opener, init_repo, open_repo, run_archive
from cdp.config import load_receiver

MTIME = 1_700_000_000  # even: FAT keeps modification times to 2 seconds
GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
BIG = random.Random(5).randbytes(3 * MiB + 123)  # spans chunks of 1 MiB

FAT_DIRS = ["Docs", "Docs/deep"]
FAT_FILES = {"hello.txt": b"hello from FAT\n", "Docs/Read Me.txt": b"a long file name\n" * 300,
             "Docs/deep/data.bin": BIG, "Docs/deep/empty": b""}
NTFS_FILES = {"hello.txt": b"hello from NTFS\n", "Read Me.txt": b"a long file name\n" * 300,
              "data.bin": BIG, "empty": b"", **{f"f{i:02}.txt": b"small %d\n" % i for i in range(30)}}
NTFS_NESTED = ("$Extend/nested.txt", b"below the root\n")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}")
                                       if os.path.exists(p)), None)
    if path is None:
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return path


def _run(*args: str | Path) -> None:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"


def _sources(root: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """The files' contents on the host, mtime MTIME, by their path in the image."""
    out = {}
    for i, (rel, data) in enumerate(files.items()):
        p = root / f"src{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (MTIME, MTIME))
        out[rel] = p
    return out


def fat_image(path: Path, bits: int, size: int, files: dict[str, bytes] = FAT_FILES,
              dirs: list[str] = FAT_DIRS) -> Path:
    """mkfs.vfat -F bits on a file, directories by mmd, files by mcopy -m (keeps the mtime)."""
    mkfs = _tool("mkfs.vfat", "dosfstools")
    mmd, mcopy = _tool("mmd", "mtools"), _tool("mcopy", "mtools")
    with open(path, "wb") as fh:
        fh.truncate(size)
    _run(mkfs, "-F", str(bits), "-n", "CDPTEST", path)
    env_img = ["-i", str(path)]
    for d in dirs:
        _run(mmd, *env_img, f"::/{d}")
    for rel, src in _sources(path.parent / f"{path.name}.src", files).items():
        _run(mcopy, "-m", *env_img, src, f"::/{rel}")
    return path


def ntfs_image(path: Path, size: int, files: dict[str, bytes] = NTFS_FILES,
               nested: tuple[str, bytes] | None = NTFS_NESTED) -> Path:
    """mkntfs on a file, files put in by ntfscp -t (keeps the mtime)."""
    mkntfs, ntfscp = _tool("mkntfs", "ntfs-3g"), _tool("ntfscp", "ntfs-3g")
    with open(path, "wb") as fh:
        fh.truncate(size)
    _run(mkntfs, "-F", "-Q", "-s", "512", "-L", "CDPTEST", path)
    all_files = {**files, **dict([nested] if nested else [])}
    for rel, src in _sources(path.parent / f"{path.name}.src", all_files).items():
        _run(ntfscp, "-q", "-t", path, src, f"/{rel}")
    return path


def partitioned(path: Path, label: str, parts: list[tuple[str, Path | None, int]]) -> Path:
    """A disk with an sfdisk table; each (type, file-system image or None, size) becomes a partition,
    the image copied in at its offset."""
    sfdisk = _tool("sfdisk", "fdisk")
    start, table, copies = 2048, [f"label: {label}"], []
    for kind, img, size in parts:
        sectors = size // 512
        table.append(f"start={start}, size={sectors}, type={kind}")
        if img is not None:
            copies.append((img, start * 512))
        start += sectors
    with open(path, "wb") as fh:
        fh.truncate(start * 512 + MiB)
    subprocess.run([sfdisk, "-q", str(path)], input="\n".join(table).encode() + b"\n", check=True)
    with open(path, "r+b") as out:
        for img, offset in copies:
            with open(img, "rb") as src:
                out.seek(offset)
                while block := src.read(MiB):
                    out.write(block)
    return path


def _archive(tmp_path: Path, img: Path) -> tuple[Path, str]:
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"), chunk_size="1MiB",
                                 pack_size="4MiB")
    cfg = load_receiver(toml)
    run_sync(init_repo(cfg.archives[0]))
    rep = run_archive(cfg, "offsite", opener=file_opener({"vol1": img}))
    return toml, rep.snapshot[:8]


def _ls(toml: Path, snap: str, path: str = "/", *extra: str) -> dict:
    r = run_cdp("archive", "ls", "-c", toml, snap, "vol1", path, "--json", *extra)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)


def _get(toml: Path, snap: str, path: str, dest: Path, *extra: str) -> None:
    r = run_cdp("archive", "get", "-c", toml, snap, "vol1", path, "--to", dest, *extra)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bits,size", [(12, 8 * MiB), (16, 24 * MiB), (32, 40 * MiB)])
def test_fat_image_ls_and_get(tmp_path: Path, bits: int, size: int) -> None:
    img = fat_image(tmp_path / "fat.img", bits, size)
    toml, snap = _archive(tmp_path, img)
    listing = _ls(toml, snap)
    assert listing["partition"] is None
    # the volume label is no entry; "hello.txt" is an 8.3 name kept lower-case by its NT flags
    assert {e["name"]: (e["type"], e["mode"]) for e in listing["entries"]} == {
        "hello.txt": ("file", "0o644"), "Docs": ("dir", "0o755")}
    deep = {e["name"]: e for e in _ls(toml, snap, "/Docs/deep")["entries"]}
    assert {n: (e["type"], e["size"]) for n, e in deep.items()} == {
        "data.bin": ("file", len(BIG)), "empty": ("file", 0)}
    assert abs(deep["data.bin"]["mtime"] - MTIME) <= 2
    assert [e["name"] for e in _ls(toml, snap, "/Docs/Read Me.txt")["entries"]] == ["Read Me.txt"]

    dest = tmp_path / "out"
    dest.mkdir()
    _get(toml, snap, "/Docs/deep/data.bin", dest)
    got = dest / "data.bin"
    assert got.read_bytes() == BIG
    assert abs(got.stat().st_mtime - MTIME) <= 2 and got.stat().st_mode & 0o777 == 0o644
    _get(toml, snap, "docs/read me.txt", dest / "readme-copy.txt")  # FAT names match in any case
    assert (dest / "readme-copy.txt").read_bytes() == FAT_FILES["Docs/Read Me.txt"]
    _get(toml, snap, "/", dest / "all")
    assert _tree(dest / "all") == FAT_FILES
    assert (dest / "all" / "Docs" / "deep").stat().st_mode & 0o777 == 0o755
    r = run_cdp("archive", "get", "-c", toml, snap, "vol1", "/Docs/nope", "--to", dest)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_ntfs_image_ls_and_get(tmp_path: Path) -> None:
    img = ntfs_image(tmp_path / "ntfs.img", 24 * MiB)
    toml, snap = _archive(tmp_path, img)
    listing = _ls(toml, snap)
    assert listing["partition"] is None
    entries = {e["name"]: e for e in listing["entries"]}
    assert set(entries) == set(NTFS_FILES)  # no $MFT, $Bitmap, $Extend, ... and no "."
    assert all(e["type"] == "file" and e["mode"] == "0o644" for e in entries.values())
    assert {n: e["size"] for n, e in entries.items()} == {n: len(d) for n, d in NTFS_FILES.items()}
    assert abs(entries["data.bin"]["mtime"] - MTIME) <= 1

    dest = tmp_path / "out"
    dest.mkdir()
    _get(toml, snap, "/data.bin", dest)
    assert (dest / "data.bin").read_bytes() == BIG
    assert abs((dest / "data.bin").stat().st_mtime - MTIME) <= 1
    _get(toml, snap, "READ ME.TXT", dest / "readme.txt")  # Windows names match in any case
    assert (dest / "readme.txt").read_bytes() == NTFS_FILES["Read Me.txt"]
    # below the root: the system directory $Extend, asked for by name
    assert "nested.txt" in {e["name"] for e in _ls(toml, snap, "/$Extend")["entries"]}
    _get(toml, snap, "/$Extend/nested.txt", dest)
    assert (dest / "nested.txt").read_bytes() == NTFS_NESTED[1]
    _get(toml, snap, "/", dest / "all")
    assert _tree(dest / "all") == NTFS_FILES
    r = run_cdp("archive", "ls", "-c", toml, snap, "vol1", "/nope/x")
    assert r.returncode == 2 and "no such file" in r.stderr


def test_mbr_with_fat_ntfs_and_ext4_partitions(tmp_path: Path) -> None:
    fat = fat_image(tmp_path / "p1.img", 16, 16 * MiB)
    ntfs = ntfs_image(tmp_path / "p2.img", 16 * MiB, {"hello.txt": b"ntfs in an MBR partition\n"}, None)
    ext = ext4_image(tmp_path / "p3.img", {"etc/hostname": b"dr-host\n"}, 8 * MiB)
    img = partitioned(tmp_path / "disk.img", "dos", [("e", fat, 16 * MiB), ("7", ntfs, 16 * MiB),
                                                      ("83", ext, 8 * MiB)])
    toml, snap = _archive(tmp_path, img)
    listing = _ls(toml, snap)  # the first partition with ext, as before FAT and NTFS were read
    assert listing["partition"] == 3 and {"etc", "lost+found"} <= {e["name"] for e in listing["entries"]}
    listing = _ls(toml, snap, "/", "--partition", "1")
    assert listing["partition"] == 1 and {e["name"] for e in listing["entries"]} == {"hello.txt", "Docs"}
    listing = _ls(toml, snap, "/", "--partition", "2")
    assert listing["partition"] == 2 and [e["name"] for e in listing["entries"]] == ["hello.txt"]
    dest = tmp_path / "out"
    dest.mkdir()
    _get(toml, snap, "/Docs/deep/data.bin", dest / "fat.bin", "--partition", "1")
    assert (dest / "fat.bin").read_bytes() == BIG
    _get(toml, snap, "/hello.txt", dest / "ntfs.txt", "--partition", "2")
    assert (dest / "ntfs.txt").read_bytes() == b"ntfs in an MBR partition\n"
    _get(toml, snap, "/etc/hostname", dest / "ext.txt")
    assert (dest / "ext.txt").read_bytes() == b"dr-host\n"
    r = run_cdp("archive", "ls", "-c", toml, snap, "vol1", "--partition", "4")
    assert r.returncode == 2 and "no partition 4" in r.stderr and "1, 2, 3" in r.stderr


def test_gpt_prefers_ntfs_over_the_efi_system_partition(tmp_path: Path) -> None:
    esp = fat_image(tmp_path / "esp.img", 32, 40 * MiB)
    ntfs = ntfs_image(tmp_path / "c.img", 24 * MiB)
    img = partitioned(tmp_path / "disk.img", "gpt", [(GPT_ESP, esp, 40 * MiB),
                                                      (GPT_BASIC_DATA, ntfs, 24 * MiB)])
    toml, snap = _archive(tmp_path, img)
    listing = _ls(toml, snap)
    assert listing["partition"] == 2 and {e["name"] for e in listing["entries"]} == set(NTFS_FILES)
    dest = tmp_path / "out"
    dest.mkdir()
    _get(toml, snap, "/data.bin", dest)
    assert (dest / "data.bin").read_bytes() == BIG
    listing = _ls(toml, snap, "/Docs", "--partition", "1")
    assert listing["partition"] == 1 and {e["name"] for e in listing["entries"]} == {"Read Me.txt", "deep"}
    _get(toml, snap, "/Docs", dest / "esp-docs", "--partition", "1")
    assert _tree(dest / "esp-docs") == {k.removeprefix("Docs/"): v for k, v in FAT_FILES.items()
                                        if k.startswith("Docs/")}


def test_only_the_chunks_needed_are_fetched_from_an_ntfs_partition(tmp_path: Path) -> None:
    from cdp.archive.files import list_path, open_fs
    from cdp.archive.restore import Portal, SnapshotImage

    ntfs = ntfs_image(tmp_path / "c.img", 32 * MiB, {"hello.txt": b"hi\n", "data.bin": BIG}, None)
    img = partitioned(tmp_path / "disk.img", "gpt", [(GPT_BASIC_DATA, ntfs, 32 * MiB)])
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"), chunk_size="1MiB")
    cfg = load_receiver(toml)
    run_sync(init_repo(cfg.archives[0]))
    rep = run_archive(cfg, "offsite", opener=file_opener({"vol1": img}))
    with Portal() as portal:
        repo = portal.call(open_repo(cfg.archives[0]))
        portal.call(repo.load_index())
        snap = portal.call(repo.find_snapshot(rep.snapshot))
        image = SnapshotImage(repo, snap.volumes[0], portal, cache_chunks=4)
        fs, part = open_fs(image)  # type: ignore[arg-type]
        assert (fs.kind, part) == ("ntfs", 1)
        assert {e["name"] for e in list_path(fs, "/")} == {"hello.txt", "data.bin"}
        assert fs.get("/hello.txt").open().read() == b"hi\n"
        stored = rep.volumes[0].chunks - rep.volumes[0].zero_chunks
        assert 0 < image.fetches < stored  # never the whole image


def test_no_known_file_system(tmp_path: Path) -> None:
    noise = tmp_path / "noise.img"
    noise.write_bytes(random.Random(9).randbytes(4 * MiB))
    toml, snap = _archive(tmp_path, noise)
    r = run_cdp("archive", "ls", "-c", toml, snap, "vol1")
    assert r.returncode == 1 and "no ext2/3/4, FAT or NTFS file system found" in r.stderr
    assert "no partition table" in r.stderr

    empty = partitioned(tmp_path / "empty.img", "dos", [("7", None, 2 * MiB)])  # a partition of zeros
    toml2 = receiver_with_archive(tmp_path / "rx2", str(tmp_path / "repo2"), chunk_size="1MiB")
    cfg = load_receiver(toml2)
    run_sync(init_repo(cfg.archives[0]))
    snap2 = run_archive(cfg, "offsite", opener=file_opener({"vol1": empty})).snapshot[:8]
    r = run_cdp("archive", "get", "-c", toml2, snap2, "vol1", "/x", "--to", tmp_path / "x")
    assert r.returncode == 1 and "no ext2/3/4, FAT or NTFS file system found in the image's partitions (1)" \
        in r.stderr
    assert not (tmp_path / "x").exists()
