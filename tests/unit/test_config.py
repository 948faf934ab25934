"""Loading and validating receiver and source TOML files (cdp.config)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from cdp.config import (
    DEFAULT_BLOCK_SIZE,
    ReceiverConfig,
    SourceConfig,
    load_receiver,
    load_source,
    valid_name,
)
from cdp.errors import ConfigError

TOKEN = "0123456789abcdef0123456789abcdef"


def write_token(path: Path, text: str = TOKEN, mode: int = 0o600) -> Path:
    """A token file created with `mode` from the start (never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)
    return path


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir()
    write_token(d / "host1.token")
    return d


RECEIVER = """\
[receiver]
listen = "127.0.0.1:7400"
data_dir = "replicas"

[[receiver.client]]
name = "host1"
token_file = "host1.token"
volumes = ["vm1-disk0", "vm2"]
"""

SOURCE = """\
[source]
name = "host1"
receiver = "127.0.0.1:7400"
token_file = "host1.token"
state_dir = "state"

[[volume]]
name = "vm1-disk0"
path = "images/vm1-disk0.raw"
"""


def receiver_with(cfg_dir: Path, text: str = RECEIVER) -> Path:
    return write_config(cfg_dir / "receiver.toml", text)


def source_with(cfg_dir: Path, text: str = SOURCE) -> Path:
    return write_config(cfg_dir / "source.toml", text)


def config_error(loader, path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        loader(path)
    assert info.value.exit_code == 2
    return str(info.value)


# ---------------------------------------------------------------- receiver


def test_receiver_minimal(cfg_dir):
    cfg = load_receiver(receiver_with(cfg_dir))
    assert isinstance(cfg, ReceiverConfig)
    assert cfg.path == (cfg_dir / "receiver.toml").resolve()
    assert cfg.listen == ("127.0.0.1", 7400)
    assert cfg.data_dir == cfg_dir.resolve() / "replicas"
    assert cfg.tls is None
    (client,) = cfg.clients
    assert client.name == "host1"
    assert client.token == TOKEN.encode()
    assert client.volumes == ("vm1-disk0", "vm2")
    assert cfg.client("host1") is client
    assert cfg.client("host2") is None


def test_receiver_defaults(cfg_dir):
    cfg = load_receiver(receiver_with(cfg_dir, "[receiver]\n"))
    assert cfg.listen == ("127.0.0.1", 7400)
    assert cfg.data_dir == cfg_dir.resolve() / "replicas"
    assert cfg.clients == ()
    assert cfg.max_frame == 32 * 1024 * 1024
    assert cfg.idle_timeout == 10.0  # a silent source is noticed within seconds


def test_receiver_relative_paths_use_config_folder_not_cwd(cfg_dir, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    receiver_with(cfg_dir, RECEIVER + textwrap.dedent("""\
        [receiver.tls]
        cert = "tls/cert.pem"
        key = "tls/key.pem"
        client_ca = "tls/ca.pem"
        """))
    monkeypatch.chdir(elsewhere)
    cfg = load_receiver(os.path.relpath(cfg_dir / "receiver.toml", elsewhere))
    base = cfg_dir.resolve()
    assert cfg.path == base / "receiver.toml"
    assert cfg.data_dir == base / "replicas"
    assert cfg.tls is not None
    assert cfg.tls.cert == base / "tls" / "cert.pem"
    assert cfg.tls.key == base / "tls" / "key.pem"
    assert cfg.tls.client_ca == base / "tls" / "ca.pem"
    # the token was found next to the config, not in the working directory
    assert cfg.clients[0].token == TOKEN.encode()


def test_receiver_absolute_paths_kept(cfg_dir, tmp_path):
    absdir = tmp_path / "abs-replicas"
    tok = write_token(tmp_path / "other" / "t.token", "abcdefghijklmnopqrstuvwxyz")
    cfg = load_receiver(receiver_with(cfg_dir, f"""\
[receiver]
data_dir = "{absdir}"
[[receiver.client]]
name = "host1"
token_file = "{tok}"
volumes = []
"""))
    assert cfg.data_dir == absdir
    assert cfg.clients[0].token == b"abcdefghijklmnopqrstuvwxyz"


def test_receiver_sizes_and_durations(cfg_dir):
    cfg = load_receiver(receiver_with(cfg_dir, RECEIVER.replace(
        'data_dir = "replicas"', 'data_dir = "replicas"\nmax_frame = "8MiB"\nidle_timeout = "2m"')))
    assert cfg.max_frame == 8 * 1024 * 1024
    assert cfg.idle_timeout == 120.0


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('max_frame = "512KiB"', "receiver.max_frame"),
        ('max_frame = "2GiB"', "receiver.max_frame"),
        ('idle_timeout = "soon"', "receiver.idle_timeout"),
        ('listen = "7400"', "receiver.listen"),
        ('listen = "host:70000"', "receiver.listen"),
        ("listen = 7400", "receiver.listen"),
        ('data_dir = ""', "receiver.data_dir"),
    ],
)
def test_receiver_bad_values(cfg_dir, line, key):
    old = 'listen = "127.0.0.1:7400"' if line.startswith("listen") else 'data_dir = "replicas"'
    path = receiver_with(cfg_dir, RECEIVER.replace(old, line))
    msg = config_error(load_receiver, path)
    assert str(path.resolve()) in msg
    assert key in msg


def test_receiver_unknown_key(cfg_dir):
    path = receiver_with(cfg_dir, RECEIVER.replace("[receiver]\n", "[receiver]\nlisen = \"x:1\"\n"))
    msg = config_error(load_receiver, path)
    assert str(path.resolve()) in msg
    assert "receiver.lisen" in msg
    assert "unknown key" in msg


def test_receiver_unknown_key_in_client(cfg_dir):
    path = receiver_with(cfg_dir, RECEIVER + 'volume = ["x"]\n')
    msg = config_error(load_receiver, path)
    assert str(path.resolve()) in msg
    assert "receiver.client[0].volume" in msg
    assert "unknown key" in msg


def test_receiver_unknown_key_in_tls(cfg_dir):
    path = receiver_with(cfg_dir, RECEIVER.replace(
        "[[receiver.client]]",
        '[receiver.tls]\ncert = "c.pem"\nkey = "k.pem"\nciphers = "ALL"\n\n[[receiver.client]]'))
    msg = config_error(load_receiver, path)
    assert "receiver.tls.ciphers" in msg
    assert "unknown key" in msg


def test_receiver_unknown_table(cfg_dir):
    path = receiver_with(cfg_dir, RECEIVER + '\n[reciever]\nlisten = "x:1"\n')
    msg = config_error(load_receiver, path)
    assert str(path.resolve()) in msg
    assert "[reciever]" in msg
    assert "unknown table" in msg


def test_receiver_source_table_is_unknown(cfg_dir):
    path = receiver_with(cfg_dir, RECEIVER + "\n" + SOURCE)
    msg = config_error(load_receiver, path)
    assert "unknown table" in msg
    assert "[source]" in msg or "[volume]" in msg


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "..", "a..b", "-x", "", "a b",
                                  "x" * 129, "é"])
def test_receiver_bad_client_name(cfg_dir, name):
    path = receiver_with(cfg_dir, RECEIVER.replace('name = "host1"', f'name = "{name}"'))
    msg = config_error(load_receiver, path)
    assert "receiver.client[0].name" in msg


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", ".."])
def test_receiver_bad_volume_name(cfg_dir, name):
    path = receiver_with(cfg_dir, RECEIVER.replace('"vm2"', f'"{name}"'))
    msg = config_error(load_receiver, path)
    assert "receiver.client[0].volumes" in msg
    assert name in msg


def test_receiver_volumes_must_be_a_list(cfg_dir):
    path = receiver_with(cfg_dir, RECEIVER.replace('["vm1-disk0", "vm2"]', '"vm1-disk0"'))
    assert "receiver.client[0].volumes" in config_error(load_receiver, path)


@pytest.mark.parametrize("key", ["name", "token_file", "volumes"])
def test_receiver_client_required_keys(cfg_dir, key):
    lines = [ln for ln in RECEIVER.splitlines() if not ln.startswith(f"{key} =")]
    path = receiver_with(cfg_dir, "\n".join(lines) + "\n")
    msg = config_error(load_receiver, path)
    assert f"receiver.client[0].{key}" in msg
    assert "required" in msg


def test_receiver_duplicate_client_names(cfg_dir):
    path = receiver_with(cfg_dir, RECEIVER + RECEIVER.split("\n\n", 1)[1])
    msg = config_error(load_receiver, path)
    assert "receiver.client" in msg
    assert "same name" in msg


def test_receiver_client_must_be_array_of_tables(cfg_dir):
    path = receiver_with(cfg_dir, '[receiver]\nclient = "host1"\n')
    assert "receiver.client" in config_error(load_receiver, path)


@pytest.mark.parametrize("missing", ["cert", "key"])
def test_receiver_tls_needs_cert_and_key(cfg_dir, missing):
    other = {"cert": 'key = "k.pem"', "key": 'cert = "c.pem"'}[missing]
    path = receiver_with(cfg_dir, RECEIVER.replace(
        "[[receiver.client]]", f"[receiver.tls]\n{other}\n\n[[receiver.client]]"))
    msg = config_error(load_receiver, path)
    assert f"receiver.tls.{missing}" in msg
    assert "required" in msg


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_token_readable_by_others_refused(cfg_dir, mode):
    os.chmod(cfg_dir / "host1.token", mode)
    path = receiver_with(cfg_dir)
    msg = config_error(load_receiver, path)
    token_path = str(cfg_dir.resolve() / "host1.token")
    assert str(path.resolve()) in msg
    assert "receiver.client[0].token_file" in msg
    assert f"chmod 600 {token_path}" in msg


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_token_private_modes_accepted(cfg_dir, mode):
    os.chmod(cfg_dir / "host1.token", mode)
    assert load_receiver(receiver_with(cfg_dir)).clients[0].token == TOKEN.encode()


def test_token_missing(cfg_dir):
    path = receiver_with(cfg_dir, RECEIVER.replace("host1.token", "nope.token"))
    msg = config_error(load_receiver, path)
    assert "receiver.client[0].token_file" in msg
    assert "nope.token" in msg


@pytest.mark.parametrize("text", ["", "short", "x" * 15, "   0123456789abcde  \n", "\n" * 40])
def test_token_too_short(cfg_dir, text):
    (cfg_dir / "host1.token").unlink()
    write_token(cfg_dir / "host1.token", text)
    msg = config_error(load_receiver, receiver_with(cfg_dir))
    assert "too short" in msg
    assert "receiver.client[0].token_file" in msg


def test_token_whitespace_stripped(cfg_dir):
    (cfg_dir / "host1.token").unlink()
    write_token(cfg_dir / "host1.token", "\n  0123456789abcdef  \n")
    cfg = load_receiver(receiver_with(cfg_dir))
    assert cfg.clients[0].token == b"0123456789abcdef"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_receiver(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="no such config file"):
        load_source(tmp_path / "absent.toml")


def test_invalid_toml(cfg_dir):
    path = receiver_with(cfg_dir, "[receiver\nlisten = 1\n")
    msg = config_error(load_receiver, path)
    assert "not valid TOML" in msg
    assert str(path.resolve()) in msg


# ---------------------------------------------------------------- source


def test_source_minimal(cfg_dir):
    cfg = load_source(source_with(cfg_dir))
    base = cfg_dir.resolve()
    assert isinstance(cfg, SourceConfig)
    assert cfg.path == base / "source.toml"
    assert cfg.name == "host1"
    assert cfg.receiver == ("127.0.0.1", 7400)
    assert cfg.token == TOKEN.encode()
    assert cfg.state_dir == base / "state"
    (vol,) = cfg.volumes
    assert vol.name == "vm1-disk0"
    assert vol.path == base / "images" / "vm1-disk0.raw"
    assert vol.mode == "scan"
    assert vol.block_size == DEFAULT_BLOCK_SIZE
    assert cfg.volume("vm1-disk0") is vol
    assert cfg.volume("other") is None
    assert cfg.tls is None
    assert cfg.filesets == ()


def test_source_relative_paths_use_config_folder_not_cwd(cfg_dir, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    text = SOURCE.replace('state_dir = "state"\n', "") + textwrap.dedent("""\
        [[fileset]]
        name = "vm1-config"
        paths = ["conf/vm1.xml", "/abs/net.xml"]
        """)
    text = text.replace("[[volume]]", '[source.tls]\nca = "ca.pem"\ncert = "c.pem"\n'
                        'key = "k.pem"\nserver_name = "dr"\n\n[[volume]]')
    source_with(cfg_dir, text)
    monkeypatch.chdir(elsewhere)
    cfg = load_source(Path(os.path.relpath(cfg_dir / "source.toml", elsewhere)))
    base = cfg_dir.resolve()
    assert cfg.state_dir == base / "state"
    assert cfg.volumes[0].path == base / "images" / "vm1-disk0.raw"
    assert cfg.filesets[0].name == "vm1-config"
    assert cfg.filesets[0].paths == (base / "conf" / "vm1.xml", Path("/abs/net.xml"))
    assert cfg.tls is not None
    assert (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) == (base / "ca.pem", base / "c.pem",
                                                       base / "k.pem")
    assert cfg.tls.server_name == "dr"
    assert cfg.token == TOKEN.encode()


def test_source_volume_options(cfg_dir):
    cfg = load_source(source_with(cfg_dir, SOURCE + textwrap.dedent("""\
        block_size = "1MiB"
        scan_interval = "30s"
        min_scan_interval = "500ms"
        snapshot = "reflink"
        pre_scan = "sync"
        """)))
    vol = cfg.volumes[0]
    assert vol.block_size == 1024 * 1024
    assert vol.scan_interval == 30.0
    assert vol.min_scan_interval == 0.5
    assert vol.snapshot == "reflink"
    assert vol.pre_scan == "sync"


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"4KiB"', 4096), ('"8KiB"', 8192), ('"64KiB"', 65536), ('"1MiB"', 1 << 20),
     ('"4MiB"', 4 << 20), ("4096", 4096), ("4194304", 4 << 20)],
)
def test_block_size_good(cfg_dir, value, expected):
    cfg = load_source(source_with(cfg_dir, SOURCE + f"block_size = {value}\n"))
    assert cfg.volumes[0].block_size == expected


@pytest.mark.parametrize(
    "value",
    ['"2KiB"', '"8MiB"', '"12KiB"', '"96KiB"', "3000", "0", "4095", "65537", '"64KB"',
     '"big"', "-4096", "true", '"4 KiB B"'],
)
def test_block_size_bad(cfg_dir, value):
    path = source_with(cfg_dir, SOURCE + f"block_size = {value}\n")
    msg = config_error(load_source, path)
    assert str(path.resolve()) in msg
    assert "volume[0].block_size" in msg


def test_block_size_message_explains(cfg_dir):
    msg = config_error(load_source, source_with(cfg_dir, SOURCE + 'block_size = "12KiB"\n'))
    assert "power of two" in msg


def test_duplicate_volume_names(cfg_dir):
    path = source_with(cfg_dir, SOURCE + '\n[[volume]]\nname = "vm1-disk0"\npath = "other.raw"\n')
    msg = config_error(load_source, path)
    assert str(path.resolve()) in msg
    assert "vm1-disk0" in msg
    assert "twice" in msg


def test_volume_and_fileset_share_namespace(cfg_dir):
    path = source_with(cfg_dir, SOURCE + '\n[[fileset]]\nname = "vm1-disk0"\npaths = ["a"]\n')
    assert "vm1-disk0" in config_error(load_source, path)


def test_nothing_to_protect(cfg_dir):
    path = source_with(cfg_dir, SOURCE.split("[[volume]]")[0])
    assert "nothing to protect" in config_error(load_source, path)


def test_fileset_only_is_enough(cfg_dir):
    text = SOURCE.split("[[volume]]")[0] + '[[fileset]]\nname = "cfg"\npaths = ["a.xml"]\n'
    cfg = load_source(source_with(cfg_dir, text))
    assert cfg.volumes == ()
    assert cfg.filesets[0].paths == (cfg_dir.resolve() / "a.xml",)


def test_fileset_paths_must_be_non_empty(cfg_dir):
    path = source_with(cfg_dir, SOURCE + '\n[[fileset]]\nname = "cfg"\npaths = []\n')
    assert "fileset[0].paths" in config_error(load_source, path)


@pytest.mark.parametrize(
    ("drop", "key"),
    [("name = \"host1\"", "source.name"),
     ("receiver = ", "source.receiver"),
     ("token_file = ", "source.token_file"),
     ("name = \"vm1-disk0\"", "volume[0].name"),
     ("path = ", "volume[0].path")],
)
def test_source_required_keys(cfg_dir, drop, key):
    lines = [ln for ln in SOURCE.splitlines() if not ln.startswith(drop)]
    path = source_with(cfg_dir, "\n".join(lines) + "\n")
    msg = config_error(load_source, path)
    assert str(path.resolve()) in msg
    assert key in msg
    assert "required" in msg


def test_source_table_missing(cfg_dir):
    path = source_with(cfg_dir, "[[volume]]" + SOURCE.split("[[volume]]")[1])
    assert "source.name" in config_error(load_source, path)


@pytest.mark.parametrize(
    ("where", "name", "key"),
    [("source", "../x", "source.name"),
     ("source", "a/b", "source.name"),
     ("volume", ".hidden", "volume[0].name"),
     ("volume", "..", "volume[0].name"),
     ("volume", "../x", "volume[0].name"),
     ("volume", "a/b", "volume[0].name"),
     ("volume", "a\\\\b", "volume[0].name")],
)
def test_source_bad_names(cfg_dir, where, name, key):
    old = 'name = "host1"' if where == "source" else 'name = "vm1-disk0"'
    path = source_with(cfg_dir, SOURCE.replace(old, f'name = "{name}"'))
    msg = config_error(load_source, path)
    assert key in msg
    assert "not a valid name" in msg


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", ".."])
def test_fileset_bad_names(cfg_dir, name):
    path = source_with(cfg_dir, SOURCE + f'\n[[fileset]]\nname = "{name}"\npaths = ["a"]\n')
    assert "fileset[0].name" in config_error(load_source, path)


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "..", "a..b", "", "x" * 129,
                                  "/abs", "a\\b", "a\x00b", "-a", "_a"])
def test_valid_name_refuses(name):
    assert not valid_name(name)


@pytest.mark.parametrize("name", ["a", "vm1-disk0", "A.b_c-9", "x" * 128, "9", "a.b"])
def test_valid_name_accepts(name):
    assert valid_name(name)


@pytest.mark.parametrize("name", ["vm1\n", "a.b\n"])
def test_valid_name_refuses_trailing_newline(name):
    assert not valid_name(name)


def test_source_volume_name_with_trailing_newline_refused(cfg_dir):
    path = source_with(cfg_dir, SOURCE.replace('name = "vm1-disk0"', 'name = "vm1\\n"'))
    assert "volume[0].name" in config_error(load_source, path)


def test_source_unknown_key(cfg_dir):
    path = source_with(cfg_dir, SOURCE.replace("[source]\n", "[source]\nwindw = 4\n"))
    msg = config_error(load_source, path)
    assert str(path.resolve()) in msg
    assert "source.windw" in msg
    assert "unknown key" in msg


def test_source_unknown_key_in_volume(cfg_dir):
    path = source_with(cfg_dir, SOURCE + "blocksize = 4096\n")
    msg = config_error(load_source, path)
    assert str(path.resolve()) in msg
    assert "volume[0].blocksize" in msg
    assert "unknown key" in msg


def test_source_unknown_key_in_second_volume(cfg_dir):
    path = source_with(cfg_dir, SOURCE + '\n[[volume]]\nname = "b"\npath = "b"\nmod = "scan"\n')
    assert "volume[1].mod" in config_error(load_source, path)


def test_source_unknown_key_in_tls(cfg_dir):
    path = source_with(cfg_dir, SOURCE.replace("[[volume]]", '[source.tls]\nverify = false\n\n'
                                               "[[volume]]"))
    assert "source.tls.verify" in config_error(load_source, path)


def test_source_unknown_table(cfg_dir):
    path = source_with(cfg_dir, SOURCE + '\n[[volumes]]\nname = "x"\n')
    msg = config_error(load_source, path)
    assert str(path.resolve()) in msg
    assert "[volumes]" in msg
    assert "unknown table" in msg


def test_source_volume_must_be_array_of_tables(cfg_dir):
    text = SOURCE.replace("[[volume]]", "[volume]")
    assert "volume" in config_error(load_source, source_with(cfg_dir, text))


def test_nbd_mode_parses_listen_addresses(cfg_dir):
    path = source_with(cfg_dir, SOURCE + 'mode = "nbd"\nnbd_listen = "127.0.0.1:10809, unix:vm.sock"\n'
                       'epoch_interval = "250ms"\ncapture_memory = "64MiB"\ndirty_region = "1MiB"\n')
    vol = load_source(path).volumes[0]
    assert vol.mode == "nbd"
    assert vol.nbd_tcp == ("127.0.0.1", 10809)
    assert vol.nbd_unix == cfg_dir.resolve() / "vm.sock"
    assert (vol.epoch_interval, vol.capture_memory, vol.dirty_region) == (0.25, 64 << 20, 1 << 20)


def test_nbd_mode_needs_an_address(cfg_dir):
    msg = config_error(load_source, source_with(cfg_dir, SOURCE + 'mode = "nbd"\n'))
    assert "volume[0].nbd_listen" in msg
    assert "127.0.0.1:10809" in msg


@pytest.mark.parametrize("listen,words", [
    ('"0.0.0.0:10809"', "loopback"),
    ('"127.0.0.1"', "nbd_listen"),
    ('"unix:"', "unix:PATH"),
    ('"127.0.0.1:1,127.0.0.1:2"', "one host:port"),
])
def test_nbd_listen_checked(cfg_dir, listen, words):
    msg = config_error(load_source, source_with(cfg_dir, SOURCE + f'mode = "nbd"\nnbd_listen = {listen}\n'))
    assert "volume[0].nbd_listen" in msg
    assert words in msg


def test_nbd_dirty_region_must_hold_whole_blocks(cfg_dir):
    path = source_with(cfg_dir, SOURCE + 'mode = "nbd"\nnbd_listen = "unix:s"\nblock_size = "128KiB"\n'
                       'dirty_region = "192KiB"\n')
    assert "volume[0].dirty_region" in config_error(load_source, path)


@pytest.mark.parametrize("mode", ['"fast"', '"SCAN"', "1", '""'])
def test_unknown_mode_refused(cfg_dir, mode):
    path = source_with(cfg_dir, SOURCE + f"mode = {mode}\n")
    assert "volume[0].mode" in config_error(load_source, path)


def test_snapshot_choice_checked(cfg_dir):
    path = source_with(cfg_dir, SOURCE + 'snapshot = "lvm"\n')
    assert "volume[0].snapshot" in config_error(load_source, path)


@pytest.mark.parametrize("keys", ['cert = "c.pem"', 'key = "k.pem"',
                                  'ca = "ca.pem"\ncert = "c.pem"'])
def test_source_tls_cert_without_key_refused(cfg_dir, keys):
    path = source_with(cfg_dir, SOURCE.replace("[[volume]]", f"[source.tls]\n{keys}\n\n[[volume]]"))
    msg = config_error(load_source, path)
    assert "source.tls.cert" in msg
    assert "cert and key go together" in msg


def test_source_tls_ca_only(cfg_dir):
    cfg = load_source(source_with(cfg_dir, SOURCE.replace(
        "[[volume]]", '[source.tls]\nca = "ca.pem"\n\n[[volume]]')))
    assert cfg.tls is not None
    assert cfg.tls.ca == cfg_dir.resolve() / "ca.pem"
    assert cfg.tls.cert is None and cfg.tls.key is None


def test_source_token_mode_refused(cfg_dir):
    os.chmod(cfg_dir / "host1.token", 0o644)
    path = source_with(cfg_dir)
    msg = config_error(load_source, path)
    assert "source.token_file" in msg
    assert f"chmod 600 {cfg_dir.resolve() / 'host1.token'}" in msg


def test_source_token_too_short(cfg_dir):
    (cfg_dir / "host1.token").unlink()
    write_token(cfg_dir / "host1.token", "abc")
    msg = config_error(load_source, source_with(cfg_dir))
    assert "source.token_file" in msg
    assert "too short" in msg


@pytest.mark.parametrize(
    ("line", "key"),
    [("window = 0", "source.window"),
     ("window = 65", "source.window"),
     ("window = true", "source.window"),
     ('window = "2"', "source.window"),
     ("workers = 0", "source.workers"),
     ("compress_level = 20", "source.compress_level"),
     ('batch_bytes = "1KiB"', "source.batch_bytes"),
     ('max_frame = "100KiB"', "source.max_frame"),
     ('reconnect_min = "x"', "source.reconnect_min"),
     ('receiver = "nohost"', "source.receiver")],
)
def test_source_bad_options(cfg_dir, line, key):
    text = SOURCE.replace('state_dir = "state"', line)
    if line.startswith("receiver"):
        text = SOURCE.replace('receiver = "127.0.0.1:7400"', line)
    msg = config_error(load_source, source_with(cfg_dir, text))
    assert key in msg


def test_source_options(cfg_dir):
    cfg = load_source(source_with(cfg_dir, SOURCE.replace('state_dir = "state"', textwrap.dedent(
        """\
        window = 4
        batch_bytes = "1MiB"
        max_epoch_bytes = "1GiB"
        compress_level = 3
        workers = 1
        reconnect_min = "250ms"
        reconnect_max = "1m"
        max_frame = "8MiB"
        """))))
    assert cfg.window == 4
    assert cfg.batch_bytes == 1 << 20
    assert cfg.max_epoch_bytes == 1 << 30
    assert cfg.compress_level == 3
    assert cfg.workers == 1
    assert cfg.reconnect_min == 0.25
    assert cfg.reconnect_max == 60.0
    assert cfg.max_frame == 8 << 20


def test_batch_bytes_at_most_half_max_frame(cfg_dir):
    text = SOURCE.replace('state_dir = "state"', 'batch_bytes = "1MiB"\nmax_frame = "1MiB"')
    msg = config_error(load_source, source_with(cfg_dir, text))
    assert "source.batch_bytes" in msg
    assert "max_frame" in msg


def test_consistency_groups_need_nbd_mode(cfg_dir):
    msg = config_error(load_source, source_with(cfg_dir, SOURCE + 'group = "vm1"\n'))
    assert "volume[0].group" in msg and "nbd" in msg
    ok = source_with(cfg_dir, SOURCE + 'group = "vm1"\nmode = "nbd"\nnbd_listen = "unix:s"\n')
    assert load_source(ok).volumes[0].group == "vm1"


def test_nbd_tls_allows_a_non_loopback_export(cfg_dir):
    for name in ("nbd.crt", "nbd.key", "ca.crt"):
        (cfg_dir / name).write_text("x")
    path = source_with(cfg_dir, SOURCE + 'mode = "nbd"\nnbd_listen = "0.0.0.0:10809"\n'
                       '[volume.nbd_tls]\ncert = "nbd.crt"\nkey = "nbd.key"\nclient_ca = "ca.crt"\n')
    vol = load_source(path).volumes[0]
    assert vol.nbd_tcp == ("0.0.0.0", 10809)
    assert vol.nbd_tls is not None and vol.nbd_tls.cert == cfg_dir.resolve() / "nbd.crt"
    bad = source_with(cfg_dir, SOURCE + 'mode = "nbd"\nnbd_listen = "unix:s"\n[volume.nbd_tls]\n'
                      'cert = "nbd.crt"\nkeys = "nbd.key"\n')
    assert "volume[0].nbd_tls" in config_error(load_source, bad)


def test_nbd_volumes_default_to_16k_blocks(cfg_dir):
    vol = load_source(source_with(cfg_dir, SOURCE + 'mode = "nbd"\nnbd_listen = "unix:s"\n')).volumes[0]
    assert vol.block_size == 16 * 1024
    assert load_source(source_with(cfg_dir, SOURCE)).volumes[0].block_size == 64 * 1024


def test_link_liveness_and_retry_defaults(cfg_dir):
    """A silent peer is noticed within seconds and a healed link is retried within seconds."""
    cfg = load_source(source_with(cfg_dir))
    assert cfg.keepalive == 2.0
    assert cfg.dead_after == 6.0  # three keepalives
    assert cfg.reconnect_min == 0.5
    assert cfg.reconnect_max == 5.0
    assert cfg.retry_max == 10.0
    rx = load_receiver(receiver_with(cfg_dir))
    assert cfg.keepalive * 4 <= rx.idle_timeout  # sources Ping well inside the receiver's limit
    # a longer keepalive keeps dead_after three keepalives away, as before
    cfg = load_source(source_with(cfg_dir, SOURCE.replace('state_dir = "state"',
                                                          'state_dir = "state"\nkeepalive = "20s"')))
    assert cfg.dead_after == 60.0


def test_reconnect_max_below_min_is_refused(cfg_dir):
    text = SOURCE.replace('state_dir = "state"', 'reconnect_min = "10s"\nreconnect_max = "2s"')
    msg = config_error(load_source, source_with(cfg_dir, text))
    assert "source.reconnect_max" in msg and "reconnect_min" in msg
