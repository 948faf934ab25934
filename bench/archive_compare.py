"""Archive throughput and stored size: cdp archive beside restic and borg, on the same image.

    python3 bench/archive_compare.py                     # 1 GiB generated image
    python3 bench/archive_compare.py --size 512MiB --tools cdp,restic
    python3 bench/archive_compare.py --image /var/lib/images/vm1.raw --json

Three passes per tool into a fresh local repository (encrypted, each tool's
defaults otherwise; zstd level 3 for borg and cdp, restic's "auto"): the
first backup of the image, a second after 1% of its 64 KiB blocks were
rewritten, and a restore of the last snapshot (whose hash is checked).
Reported per pass: seconds, MB/s of image (10^6 bytes/s), and the
repository's size on disk after it. Everything lives in one temporary folder
(page cache; no network), so this measures the tools, not the storage.
Needs restic and borg (apt-get install restic borgbackup); a missing tool
skips its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import xxhash

from cdp.archive.backend import run_sync
from cdp.archive.job import Options, backup, file_opener
from cdp.archive.repo import Repository
from cdp.archive.restore import restore_image
from cdp.units import format_bytes, parse_size

BS = 64 * 1024
PASSWORD = "benchmark password"
WORDS = b"alpha beta gamma delta kernel block epoch replica volume journal commit fsync inode".split()


def make_image(path: Path, size: int, seed: int = 1) -> None:
    """30% holes, 35% text-like, 25% random, 10% repeats of earlier blocks (in 64 KiB blocks)."""
    rng = random.Random(seed)
    seen: list[bytes] = []
    with open(path, "wb") as fh:
        fh.truncate(size)
        for i in range(size // BS):
            r = rng.random()
            if r < 0.30:
                continue
            if r < 0.65:
                out = bytearray()
                while len(out) < BS:
                    out += b" ".join(rng.choice(WORDS) for _ in range(12)) + b"\n"
                data = bytes(out[:BS])
            elif r < 0.90 or not seen:
                data = rng.randbytes(BS)
            else:
                data = rng.choice(seen)
            if len(seen) < 256:
                seen.append(data)
            os.pwrite(fh.fileno(), data, i * BS)


def change(path: Path, fraction: float, seed: int = 2) -> None:
    rng = random.Random(seed)
    blocks = os.path.getsize(path) // BS
    with open(path, "r+b") as fh:
        for i in rng.sample(range(blocks), max(1, int(blocks * fraction))):
            os.pwrite(fh.fileno(), rng.randbytes(BS), i * BS)


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while b := fh.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sh(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in args], check=True, env={**os.environ, **(env or {})}, cwd=cwd,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_cdp(work: Path, img: Path, chunk_size: int = 4 << 20) -> list[dict[str, Any]]:
    repo_dir = work / "cdp-repo"
    from cdp.archive.backend import LocalBackend

    repo = run_sync(Repository.init(LocalBackend(repo_dir), PASSWORD.encode()))
    opts = Options(chunk_size=chunk_size, archive="bench")
    opener = file_opener({"vol": img})

    def one() -> None:
        run_sync(backup(repo, [("vol", lambda: opener(work, "vol"))], opts))

    rows = [{"pass": "first backup", "seconds": timed(one), "repo": du(repo_dir)}]
    change(img, 0.01)
    rows.append({"pass": "after 1% changed", "seconds": timed(one), "repo": du(repo_dir)})
    out = work / "cdp-restored.img"

    async def restore() -> None:
        snap = (await repo.snapshots())[-1]
        await restore_image(repo, snap, "vol", out, force=True)

    rows.append({"pass": "restore", "seconds": timed(lambda: run_sync(restore())), "repo": du(repo_dir),
                 "equal": file_hash(out) == file_hash(img)})
    out.unlink()
    return rows


def run_restic(work: Path, img: Path) -> list[dict[str, Any]]:
    repo = work / "restic-repo"
    env = {"RESTIC_PASSWORD": PASSWORD, "RESTIC_REPOSITORY": str(repo), "RESTIC_CACHE_DIR": str(work / "rc")}
    sh("restic", "init", env=env)
    rows = [{"pass": "first backup", "seconds": timed(lambda: sh("restic", "backup", img.name, env=env,
                                                              cwd=img.parent)), "repo": du(repo)}]
    change(img, 0.01, seed=2)
    rows.append({"pass": "after 1% changed", "seconds": timed(lambda: sh("restic", "backup", img.name,
                                                                      env=env, cwd=img.parent)),
                 "repo": du(repo)})
    target = work / "restic-out"
    rows.append({"pass": "restore", "seconds": timed(lambda: sh("restic", "restore", "latest", "--target",
                                                                 target, env=env)), "repo": du(repo),
                 "equal": file_hash(target / img.name) == file_hash(img)})
    shutil.rmtree(target)
    return rows


def run_borg(work: Path, img: Path) -> list[dict[str, Any]]:
    repo = work / "borg-repo"
    env = {"BORG_PASSPHRASE": PASSWORD, "BORG_REPO": str(repo), "BORG_CACHE_DIR": str(work / "bc"),
           "BORG_CONFIG_DIR": str(work / "bcfg"), "BORG_BASE_DIR": str(work / "bb")}
    sh("borg", "init", "--encryption=repokey-blake2", env=env)

    def create(name: str) -> None:
        sh("borg", "create", "--compression", "zstd,3", f"::{name}", img.name, env=env, cwd=img.parent)

    rows = [{"pass": "first backup", "seconds": timed(lambda: create("a")), "repo": du(repo)}]
    change(img, 0.01, seed=2)
    rows.append({"pass": "after 1% changed", "seconds": timed(lambda: create("b")), "repo": du(repo)})
    target = work / "borg-out"
    target.mkdir()
    rows.append({"pass": "restore", "seconds": timed(lambda: sh("borg", "extract", "::b", env=env,
                                                                 cwd=target)), "repo": du(repo),
                 "equal": file_hash(target / img.name) == file_hash(img)})
    shutil.rmtree(target)
    return rows


TOOLS = {"cdp": run_cdp, "restic": run_restic, "borg": run_borg}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--image", type=Path, help="use a copy of this image instead of a generated one")
    ap.add_argument("--tools", default="cdp,restic,borg")
    ap.add_argument("--chunk-size", default="4MiB,1MiB", help="cdp chunk sizes to run (comma-separated)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="cdp-archive-bench-") as tmp:
        work = Path(tmp)
        master = work / "master.img"
        if args.image:
            shutil.copyfile(args.image, master)
        else:
            make_image(master, parse_size(args.size))
        size = master.stat().st_size
        runs: list[tuple[str, Any]] = []
        for tool in args.tools.split(","):
            if tool == "cdp":
                for cs in args.chunk_size.split(","):
                    n = parse_size(cs)
                    runs.append((f"cdp {cs}", lambda w, i, n=n: run_cdp(w, i, n)))
            elif shutil.which(tool) is None:
                print(f"skipping {tool}: not installed", file=sys.stderr)
            else:
                runs.append((tool, TOOLS[tool]))
        for tool, fn in runs:
            tdir = work / tool.replace(" ", "-")
            tdir.mkdir()
            img = tdir / "image.raw"
            shutil.copyfile(master, img)
            rows = fn(tdir, img)
            for r in rows:
                r["MBps"] = size / r["seconds"] / 1e6
            results[tool] = rows
            img.unlink()
    if args.json:
        print(json.dumps({"image_bytes": size, "results": results}, indent=1))
        return 0
    print(f"image: {format_bytes(size)}")
    print("| tool | pass | seconds | MB/s | repository after | restored equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tool, rows in results.items():
        for r in rows:
            eq = {True: "yes", False: "NO"}.get(r.get("equal"), "")  # type: ignore[call-overload]
            print(f"| {tool} | {r['pass']} | {r['seconds']:.2f} | {r['MBps']:.0f} | "
                  f"{format_bytes(r['repo'])} | {eq} |")
    return 0 if all(r.get("equal", True) for rows in results.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
