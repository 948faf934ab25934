"""Archive snapshots carry the protected file sets: listed, restored byte for byte, kept by prune."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from helpers import add_fileset, make_image, run_cdp, wait_converged, wait_for

SET = "vm1-config"


def _archive_table(env, repo: Path) -> None:
    pw = env.root / "archive.pass"
    fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("correct horse battery staple\n")
    with open(env.receiver_toml, "a") as fh:
        fh.write(f'\n[[archive]]\nname = "offsite"\nrepository = "{repo}"\n'
                 f'password_file = "{pw}"\nschedule = "manual"\nkeep = {{ last = 1 }}\n')


def _json(*args) -> dict:
    r = run_cdp(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_file_sets_are_archived_with_each_snapshot(cdp_env, daemons, tmp_path: Path) -> None:
    env = cdp_env()
    make_image(env.source.images["vol1"], 4 << 20, random.Random(1))
    conf = tmp_path / "etc"
    conf.mkdir()
    xml = conf / "vm1.xml"
    xml.write_bytes(b"<domain><name>vm1</name></domain>\n" * 50)
    net = conf / "net.conf"
    net.write_bytes(os.urandom(5000))
    add_fileset(env, SET, [conf])
    _archive_table(env, tmp_path / "repo")
    daemons.receiver(env, inprocess=True)
    daemons.source(env, inprocess=True)
    since = time.time()
    wait_converged(env, "vol1", since)
    wait_for(lambda: len(_json("files", "list", "-c", env.receiver_toml, SET)) >= 2, 30,
             what="both files of the set to reach the receiver")
    assert run_cdp("archive", "init", "-c", env.receiver_toml).returncode == 0
    first = _json("archive", "run", "-c", env.receiver_toml)
    assert first["files"] == 2
    listed = _json("archive", "files", "-c", env.receiver_toml, "latest")
    assert sorted(f["path"] for f in listed["files"]) == sorted(
        str(p).lstrip("/") for p in (xml, net))
    # a new version, a second snapshot, prune to the last one: the files still restore
    xml.write_bytes(b"<domain><name>vm1</name><memory>4</memory></domain>\n")
    wait_for(lambda: any(v["version"] >= 2 for v in _json(
        "files", "list", "-c", env.receiver_toml, SET, str(xml).lstrip("/"))), 30,
        what="the new version of vm1.xml")
    _json("archive", "run", "-c", env.receiver_toml)
    assert run_cdp("archive", "prune", "-c", env.receiver_toml, "--grace", "0s").returncode == 0
    out = tmp_path / "restored.xml"
    r = run_cdp("archive", "files", "-c", env.receiver_toml, "latest", SET, str(xml).lstrip("/"),
                "--to", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == xml.read_bytes()
    out2 = tmp_path / "net.conf"
    assert run_cdp("archive", "files", "-c", env.receiver_toml, "latest", SET,
                   str(net).lstrip("/"), "--to", out2).returncode == 0
    assert out2.read_bytes() == net.read_bytes()
    assert run_cdp("archive", "verify", "-c", env.receiver_toml, "--read-data").returncode == 0
    r = run_cdp("archive", "files", "-c", env.receiver_toml, "latest", SET, "no/such", "--to",
                tmp_path / "x")
    assert r.returncode == 2 and "no file" in r.stderr
