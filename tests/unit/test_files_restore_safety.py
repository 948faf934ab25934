"""`cdp files list|restore`: a file set's paths and modes come from a source and are not trusted.

The store is filled directly (as a misbehaving source or a damaged store would leave it),
then the CLI runs in-process: names are escaped on the terminal and exact in JSON, setuid
is dropped unless --preserve-special, a name like ".." is refused, and a symlink planted
where the old code put its temporary file is not written through.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import xxhash

from cdp.cli.main import main
from cdp.codec import compress
from cdp.replica.files import FileSets

ESC = "etc/\x1b]0;owned\x07\x1b[2J"


@pytest.fixture
def receiver(tmp_path: Path) -> Path:
    toml = tmp_path / "receiver.toml"
    toml.write_text('[receiver]\nlisten = "127.0.0.1:7400"\ndata_dir = "replicas"\n')
    store = FileSets(tmp_path / "replicas").open("cfg")
    for path, mode in [("bin/su", 0o4755), ("etc/..", 0o644), (ESC, 0o644), ("etc/ok", 0o640)]:
        data = path.encode()
        store.put(path, xxhash.xxh3_128_digest(data), len(data), 1.7e9, mode, 1.7e9, compress(data))
    return toml


def test_list_escapes_names_json_keeps_them(receiver: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["files", "list", "-c", str(receiver), "cfg"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "/etc/\\x1b]0;owned\\x07\\x1b[2J" in out
    assert main(["files", "list", "-c", str(receiver), "cfg", "--json"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and ESC in {r["path"] for r in json.loads(out)}


def test_restore_drops_setuid_unless_asked(receiver: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert main(["files", "restore", "-c", str(receiver), "cfg", "bin/su", "--to", str(out)]) == 0
    assert (out / "su").read_bytes() == b"bin/su"
    assert stat.S_IMODE((out / "su").stat().st_mode) == 0o755 and (out / "su").stat().st_mtime == 1.7e9
    assert main(["files", "restore", "-c", str(receiver), "cfg", "bin/su", "--to", str(out / "su2"),
                 "--preserve-special"]) == 0
    assert stat.S_IMODE((out / "su2").stat().st_mode) == 0o4755


def test_restore_refuses_unsafe_names_and_planted_symlinks(receiver: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_bytes(b"untouched")
    # into a folder the file gets its own name: "..", from the source, is refused (exit 1)
    assert main(["files", "restore", "-c", str(receiver), "cfg", "etc/..", "--to", str(out),
                 "--force"]) == 1
    assert "refused" in capsys.readouterr().err and list(out.iterdir()) == []
    # the old temporary name, planted as a symlink by someone who can write into the folder
    (out / ".ok.cdp-restore").symlink_to(victim)
    assert main(["files", "restore", "-c", str(receiver), "cfg", "etc/ok", "--to", str(out)]) == 0
    assert victim.read_bytes() == b"untouched" and (out / "ok").read_bytes() == b"etc/ok"
    assert stat.S_IMODE((out / "ok").stat().st_mode) == 0o640
    # an existing symlink as DEST is replaced with --force, never written through
    (out / "link").symlink_to(victim)
    assert main(["files", "restore", "-c", str(receiver), "cfg", "etc/ok", "--to", str(out / "link"),
                 "--force"]) == 0
    assert victim.read_bytes() == b"untouched" and not (out / "link").is_symlink()
    # an escape sequence in the restored name is escaped in the report
    assert main(["files", "restore", "-c", str(receiver), "cfg", ESC, "--to", str(out)]) == 0
    assert "\x1b" not in capsys.readouterr().out
