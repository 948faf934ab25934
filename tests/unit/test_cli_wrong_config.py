"""Every verb that takes -c names the config it needs when given the other side's (issue 15),
instead of an "unknown table" error about the wrong file."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.cli.main import _parser, main

SOURCE_TOML = """\
[source]
name = "host1"
receiver = "127.0.0.1:7400"
token_file = "t.token"
[[volume]]
name = "vol1"
path = "vol1.raw"
"""

RECEIVER_TOML = """\
[receiver]
listen = "127.0.0.1:7400"
[[receiver.client]]
name = "host1"
token_file = "t.token"
volumes = ["vol1"]
[[archive]]
name = "offsite"
repository = "archive"
encrypt = false
"""


def _leaves(p: argparse.ArgumentParser,
            words: list[str]) -> Iterator[tuple[list[str], argparse.ArgumentParser]]:
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield words, p
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, [*words, name])


def _commands() -> list[tuple[list[str], str]]:
    """(command words, the config kind it needs) for every command with -c."""
    out = []
    for words, p in _leaves(_parser(), []):
        cfg = next((a for a in p._actions if a.dest == "config"), None)
        if cfg is None or words == ["status"]:  # status takes either
            continue
        wants = cfg.help or ""
        if words == ["verify"]:
            out += [(words, "source"), ([*words, "--replica"], "receiver")]
        elif wants.startswith("source"):
            out.append((words, "source"))
        else:
            assert wants.startswith("receiver"), (words, wants)
            out.append((words, "receiver"))
    return out


def _argv(words: list[str], config: Path, tmp: Path) -> list[str]:
    """A command line that parses: dummy positionals and required options."""
    verb = tuple(w for w in words if not w.startswith("-"))
    p = {tuple(w): q for w, q in _leaves(_parser(), [])}[verb]
    argv = [*words, "-c", str(config)]
    for a in p._actions:
        if a.dest in ("config", "help") or isinstance(a, argparse._SubParsersAction):
            continue
        if not a.option_strings and a.nargs not in ("*", "?"):
            argv.append("vol1")
        elif a.option_strings and a.required:
            argv += [a.option_strings[-1], str(tmp / "x") if "dir" in a.dest or "file" in a.dest
                     else "127.0.0.1:1" if a.dest in ("listen", "to") else "x"]
    return argv


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, Path]:
    fd = os.open(tmp_path / "t.token", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"0123456789abcdef0123456789abcdef")
    os.close(fd)
    (tmp_path / "source.toml").write_text(SOURCE_TOML)
    (tmp_path / "receiver.toml").write_text(RECEIVER_TOML)
    return {"source": tmp_path / "source.toml", "receiver": tmp_path / "receiver.toml"}


@pytest.mark.parametrize(("words", "wants"), _commands(), ids=lambda v: " ".join(v) if
                         isinstance(v, list) else v)
def test_the_other_sides_config_is_named(words, wants, configs, tmp_path, capsys):
    other = "receiver" if wants == "source" else "source"
    given = configs[other]
    assert main(_argv(words, given, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"{given}: this is a {other} config; `cdp {' '.join(words)}` needs the {wants}'s" in err
    assert "unknown table" not in err


def test_the_commands_cover_both_sides():
    kinds = {w: k for w, k in ((" ".join(w), k) for w, k in _commands())}
    assert kinds["verify"] == "source" and kinds["verify --replica"] == "receiver"
    assert kinds["points"] == "receiver" and kinds["checkpoint"] == "source"
    assert kinds["failover test"] == "receiver" and kinds["archive list"] == "receiver"
    assert kinds["receiver"] == "receiver" and kinds["source"] == "source"
