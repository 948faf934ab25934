"""Hostile guest file systems: `cdp archive get|ls|files` never write outside --to, drop special bits,
never follow a symlink from the image, and escape guest names on the terminal.

Images are real: mkfs.ext4 + debugfs (symlinks, setuid/setgid modes), mkfs.vfat + mcopy,
mkntfs + ntfscp. Names no tool would write ("../../../escaped.txt", an absolute path,
"evil/planted.txt", an escape sequence) are written under placeholders of the same
length, whose bytes are then replaced in the image: dissect reads directory entries
as they are. Each test restores into a target deep inside a scratch folder with a
sentinel folder beside it, and checks that nothing appeared anywhere but the target.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from archive_fixtures import receiver_with_archive
from helpers import MiB, run_cdp

from cdp.archive.backend import run_sync
from cdp.archive.job import file_opener, init_repo, run_archive
from cdp.codec import compress
from cdp.config import load_receiver

ESC_NAME = "\x1b[31mred\x1b[0m"


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}")
                                       if os.path.exists(p)), None)
    if path is None:
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return path


def _placeholder(i: int, length: int) -> str:
    return (f"P{i:02d}" + "q" * length)[:length]


def _patch(img: Path, swaps: dict[bytes, bytes]) -> None:
    """Replace each placeholder's bytes (found exactly where expected) by the hostile name's."""
    data = bytearray(img.read_bytes())
    for old, new in swaps.items():
        assert len(old) == len(new)
        at = [i for i in range(len(data)) if data.startswith(old, i)] if data.count(old) > 1 else [
            data.find(old)]
        assert at and at[0] >= 0, f"placeholder {old!r} not in the image"
        for i in at:
            data[i:i + len(old)] = new
    img.write_bytes(bytes(data))


def hostile_ext4(path: Path, outside: Path) -> Path:
    """An ext4 image whose root holds escaping names, a symlink to `outside` with a name "under"
    it, setuid/setgid entries, an escape sequence in a name, and two trees that collide."""
    mkfs, debugfs = _tool("mkfs.ext4", "e2fsprogs"), _tool("debugfs", "e2fsprogs")
    with open(path, "wb") as fh:
        fh.truncate(16 * MiB)
    subprocess.run([mkfs, "-q", "-F", "-O", "^metadata_csum", str(path)], check=True)
    src = path.parent / f"{path.name}.data"
    src.write_bytes(b"from the guest\n")
    hostile = ["../../../escaped.txt", str(outside / "abs.txt"), "evil/planted.txt", ESC_NAME]
    names = {h: _placeholder(i, len(h.encode())) for i, h in enumerate(hostile)}
    cmds = [f"write {src} ok.txt", f"write {src} suid", "sif suid mode 0104755", "mkdir sgid",
            "sif sgid mode 042775", f"write {src} sgid/inner", f"symlink evil {outside}",
            "mkdir v1", "mkdir v1/top", f"symlink v1/top/sub {outside}",
            "mkdir v2", "mkdir v2/top", "mkdir v2/top/sub", f"write {src} v2/top/sub/planted2.txt"]
    cmds += [f"write {src} {p}" for p in names.values()]
    script = path.parent / f"{path.name}.debugfs"
    script.write_text("\n".join(cmds) + "\n")
    r = subprocess.run([debugfs, "-w", "-f", str(script), str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _patch(path, {p.encode(): h.encode() for h, p in names.items()})
    return path


def fat_with_escaping_name(path: Path) -> Path:
    """FAT16 holding "../../esc.txt" as the long name of a file (13 characters: one LFN entry)."""
    mkfs, mcopy = _tool("mkfs.vfat", "dosfstools"), _tool("mcopy", "mtools")
    with open(path, "wb") as fh:
        fh.truncate(24 * MiB)
    subprocess.run([mkfs, "-F", "16", str(path)], check=True, capture_output=True)
    src = path.parent / f"{path.name}.data"
    src.write_bytes(b"from FAT\n")
    subprocess.run([mcopy, "-i", str(path), str(src), "::/abcdefghi.txt"], check=True)

    def pieces(name: str) -> list[bytes]:
        u = [c.encode("utf-16-le") for c in name] + [b"\0\0"]
        return (u + [b"\xff\xff"] * 13)[:13]
    old, new = pieces("abcdefghi.txt"), pieces("../../esc.txt")
    data = bytearray(path.read_bytes())
    at = data.find(b"".join(old[:5])) - 1  # the long-name entry: 5, 6 and 2 characters at 1, 14, 28
    assert at >= 0 and data[at + 11] == 0x0F
    data[at + 1:at + 11], data[at + 14:at + 26], data[at + 28:at + 32] = (
        b"".join(new[:5]), b"".join(new[5:11]), b"".join(new[11:]))
    path.write_bytes(bytes(data))
    return path


def ntfs_with_escaping_name(path: Path) -> Path:
    """NTFS holding "../../ntfsesc.txt" (the name in its MFT record and in the root's index)."""
    mkntfs, ntfscp = _tool("mkntfs", "ntfs-3g"), _tool("ntfscp", "ntfs-3g")
    with open(path, "wb") as fh:
        fh.truncate(24 * MiB)
    subprocess.run([mkntfs, "-F", "-Q", "-s", "512", str(path)], check=True, capture_output=True)
    src = path.parent / f"{path.name}.data"
    src.write_bytes(b"from NTFS\n")
    subprocess.run([ntfscp, "-q", "-t", str(path), str(src), "/abcdefghijklmnopq"], check=True)
    old, new = "abcdefghijklmnopq".encode("utf-16-le"), "../../ntfsesc.txt".encode("utf-16-le")
    data = bytes(path.read_bytes())
    at = [i for i in range(len(data) - len(old)) if data.startswith(old, i)]
    assert at and all(i % 512 + len(old) <= 510 for i in at), "a name straddles a sector's fixup"
    _patch(path, {old: new})
    return path


def _archive(tmp_path: Path, img: Path) -> tuple[Path, str]:
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"), chunk_size="1MiB",
                                 pack_size="4MiB")
    cfg = load_receiver(toml)
    run_sync(init_repo(cfg.archives[0]))
    rep = run_archive(cfg, "offsite", opener=file_opener({"vol1": img}))
    return toml, rep.snapshot[:8]


def _scratch(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(scratch, target deep inside it, sentinel beside it); "../../../" from below the target
    still lands inside the scratch folder, where the test looks."""
    scratch = tmp_path / "scratch"
    target = scratch / "a" / "b" / "target"
    outside = scratch / "outside"
    target.mkdir(parents=True)
    outside.mkdir()
    return scratch, target, outside


def _beside(scratch: Path, target: Path) -> set[str]:
    """Everything in the scratch folder that is not the target or inside it (symlinks not followed)."""
    found = set()
    for d, dirs, files in os.walk(scratch, followlinks=False):
        for n in dirs + files:
            p = Path(d) / n
            if p != target and target not in p.parents:
                found.add(str(p.relative_to(scratch)))
    return found


EXPECTED_BESIDE = {"a", "a/b", "outside"}


def _get(toml: Path, snap: str, path: str, to: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cdp("archive", "get", "-c", toml, snap, "vol1", path, "--to", to, *extra)


def test_ext4_escaping_names_symlinks_and_setuid(tmp_path: Path) -> None:
    scratch, target, outside = _scratch(tmp_path)
    img = hostile_ext4(tmp_path / "evil.img", outside)
    toml, snap = _archive(tmp_path, img)

    r = _get(toml, snap, "/", target)
    assert r.returncode == 1, r.stdout + r.stderr  # written what was safe, named what was not
    assert _beside(scratch, target) == EXPECTED_BESIDE and list(outside.iterdir()) == []
    root = target / "root"
    for shown in ("../../../escaped.txt", f"{outside}/abs.txt", "evil/planted.txt"):
        assert f"skipped /{shown}: refused: the name" in r.stderr, r.stderr
    assert "\x1b" not in r.stdout + r.stderr
    assert (root / "ok.txt").read_bytes() == b"from the guest\n"
    assert (root / ESC_NAME).read_bytes() == b"from the guest\n"  # odd but harmless inside the target
    assert os.readlink(root / "evil") == str(outside) and (root / "evil").is_symlink()
    assert stat.S_IMODE((root / "suid").stat().st_mode) == 0o755  # setuid dropped
    assert stat.S_IMODE((root / "sgid").stat().st_mode) == 0o775  # setgid dropped
    listed = json.loads(_get(toml, snap, "/", target / "again", "--json").stdout)
    assert {s["path"] for s in listed["skipped"]} == {
        "/../../../escaped.txt", f"/{outside}/abs.txt", "/evil/planted.txt"}

    # asked for: the special bits are kept
    special = target / "special"
    special.mkdir()
    assert _get(toml, snap, "/suid", special, "--preserve-special").returncode == 0
    assert _get(toml, snap, "/sgid", special, "--preserve-special").returncode == 0
    assert stat.S_IMODE((special / "suid").stat().st_mode) == 0o4755
    assert stat.S_IMODE((special / "sgid").stat().st_mode) == 0o2775

    # a symlink restored earlier is never written through by a later restore into the same place
    assert _get(toml, snap, "/v1/top", target).returncode == 0
    assert (target / "top" / "sub").is_symlink()
    r = _get(toml, snap, "/v2/top", target)
    assert r.returncode == 1 and "/v2/top/sub" in r.stderr and "symlink is in the way" in r.stderr
    assert list(outside.iterdir()) == [] and _beside(scratch, target) == EXPECTED_BESIDE


def test_ls_escapes_guest_names_json_keeps_them(tmp_path: Path) -> None:
    _, _, outside = _scratch(tmp_path)
    toml, snap = _archive(tmp_path, hostile_ext4(tmp_path / "evil.img", outside))
    r = run_cdp("archive", "ls", "-c", toml, snap, "vol1", "/")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\\x1b[31mred\\x1b[0m" in r.stdout
    assert f"evil -> {outside}" in r.stdout
    r = run_cdp("archive", "ls", "-c", toml, snap, "vol1", "/", "--json")
    assert "\x1b" not in r.stdout  # JSON escapes control characters itself...
    names = {e["name"] for e in json.loads(r.stdout)["entries"]}  # ...and keeps the name exact
    assert {ESC_NAME, "../../../escaped.txt", "evil/planted.txt", "evil"} <= names


@pytest.mark.parametrize("fs", ["fat", "ntfs"])
def test_fat_and_ntfs_escaping_names(tmp_path: Path, fs: str) -> None:
    scratch, target, _ = _scratch(tmp_path)
    img = (fat_with_escaping_name if fs == "fat" else ntfs_with_escaping_name)(tmp_path / f"{fs}.img")
    toml, snap = _archive(tmp_path, img)
    r = _get(toml, snap, "/", target)
    assert r.returncode == 1 and "refused: the name" in r.stderr, r.stdout + r.stderr
    assert _beside(scratch, target) == EXPECTED_BESIDE


def test_archive_files_restore_is_confined_and_drops_setuid(tmp_path: Path) -> None:
    """File-set paths are a source's: `archive files --to` writes only where it is told, without
    special bits, and never through a symlink planted where its temporary file used to go."""
    import xxhash

    from cdp.replica.files import FileSets

    scratch, target, outside = _scratch(tmp_path)
    toml = receiver_with_archive(tmp_path / "rx", str(tmp_path / "repo"))
    cfg = load_receiver(toml)
    store = FileSets(cfg.data_dir).open("cfg")
    for path, mode in [("bin/su", 0o4755), ("etc/..", 0o644), ("x/\x1b]0;t\x07", 0o644)]:
        data = path.encode()
        store.put(path, xxhash.xxh3_128_digest(data), len(data), 1.7e9, mode, 1.7e9, compress(data))
    run_sync(init_repo(cfg.archives[0]))
    img = tmp_path / "vol.img"
    img.write_bytes(bytes(MiB))
    snap = run_archive(cfg, "offsite", opener=file_opener({"vol1": img})).snapshot[:8]

    def files(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return run_cdp("archive", "files", "-c", toml, snap, *args)

    r = files()
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\x07" not in r.stdout, r.stderr
    assert "\\x1b]0;t\\x07" in r.stdout
    victim = outside / "victim"
    victim.write_bytes(b"untouched")
    (target / ".su.cdp-tmp").symlink_to(victim)  # a name the old code wrote through
    r = files("cfg", "bin/su", "--to", target / "su")
    assert r.returncode == 0, r.stderr
    assert (target / "su").read_bytes() == b"bin/su" and victim.read_bytes() == b"untouched"
    assert stat.S_IMODE((target / "su").stat().st_mode) == 0o755
    assert files("cfg", "bin/su", "--to", target / "su2", "--preserve-special").returncode == 0
    assert stat.S_IMODE((target / "su2").stat().st_mode) == 0o4755
    r = files("cfg", "etc/..", "--to", target)  # into a folder: its own name, "..", is refused
    assert r.returncode == 1 and "refused" in r.stderr, r.stderr
    assert _beside(scratch, target) == EXPECTED_BESIDE | {"outside/victim"}


def test_image_restore_never_writes_through_a_planted_temporary_name(tmp_path: Path) -> None:
    """`archive restore` wrote to ".NAME.cdp-restore" beside --to, following a symlink planted there."""
    img = tmp_path / "vol.img"
    img.write_bytes(b"disk" * (MiB // 4))
    toml, snap = _archive(tmp_path, img)
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_bytes(b"untouched")
    (out / ".vm.raw.cdp-restore").symlink_to(victim)
    r = run_cdp("archive", "restore", "-c", toml, snap, "vol1", "--to", out / "vm.raw")
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == b"untouched" and (out / "vm.raw").read_bytes() == img.read_bytes()
