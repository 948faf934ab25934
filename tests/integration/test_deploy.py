"""deploy/: the example configs load with cdp's own loader (as shipped and with every commented
option switched on), every config key is documented there, make-certs.sh makes certificates a
real receiver and source accept (and a foreign CA's are refused), and the systemd units,
compose file, Prometheus rules and Grafana dashboard are well formed."""

from __future__ import annotations

import configparser
import grp
import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    MiB,
    assert_replica_equal,
    make_image,
    scaled,
    wait_converged,
    wait_for,
    write_env,
)

from cdp.config import load_receiver, load_source

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLES = DEPLOY / "examples"
OPTION = re.compile(r"^#(?=[\[A-Za-z])")  # "#key = value" and "#[table]": an option, switched off


def _localize(text: str, root: Path) -> str:
    """Point the example's absolute paths into `root`, its hypervisor group at one of this host."""
    group = grp.getgrgid(os.getgid()).gr_name
    return (text.replace("/etc/cdp/", f"{root}/etc/").replace("/var/lib/", f"{root}/var/")
            .replace('nbd_socket_group = "kvm"', f'nbd_socket_group = "{group}"'))


def _prepare(root: Path) -> None:
    (root / "etc" / "pki").mkdir(parents=True, exist_ok=True)
    for name in ("host1.token",):
        p = root / "etc" / name
        p.write_text("0123456789abcdef0123456789abcdef\n")
        p.chmod(0o600)
    (root / "etc" / "archive.pass").write_text("secret\n")


@pytest.mark.parametrize("everything", [False, True], ids=["as-shipped", "all-options-on"])
def test_example_configs_load(tmp_path: Path, everything: bool) -> None:
    _prepare(tmp_path)
    for name, load in (("receiver.toml", load_receiver), ("source.toml", load_source)):
        text = _localize((EXAMPLES / name).read_text(), tmp_path)
        if everything:
            text = "\n".join(OPTION.sub("", line) for line in text.splitlines())
        path = tmp_path / name
        path.write_text(text)
        cfg = load(path)  # raises ConfigError naming the key if an example is wrong
        assert cfg.metrics_listen is not None
    rx = load_receiver(tmp_path / "receiver.toml")
    src = load_source(tmp_path / "source.toml")
    assert rx.tls is not None and rx.tls.client_ca is not None and rx.listen[0] == "0.0.0.0"
    assert src.tls is not None and src.tls.cert is not None
    assert rx.client("host1") is not None and rx.client("host1").token == src.token
    if everything:  # the commented options really are options, with the values they show
        assert rx.archives and rx.archives[0].name == "offsite"
        assert rx.max_connections == 64 and rx.status_listen == ("127.0.0.1", 9741)
        assert [v.mode for v in src.volumes] == ["scan", "nbd", "qemu"] and src.filesets
        assert (src.volumes[2].qmp, src.volumes[2].node) == (Path("/run/vm1.qmp"), "drive2")
        assert src.schedule and src.volumes[1].nbd_tls is not None
        assert src.volumes[1].nbd_socket_group == os.getgid() and src.volumes[1].nbd_socket_mode == 0o660


def test_every_config_key_is_documented_in_the_examples() -> None:
    source = "".join(f.read_text() for f in sorted((ROOT / "cdp" / "config").glob("*.py")))
    keys = set(re.findall(r'\b[a-z]{1,2}t\.get\(\s*"([a-z_]+)"', source))
    assert len(keys) > 30
    tables = {"tls", "client", "volume", "schedule", "keep", "nbd_tls"}  # written as [tables]
    docs = (EXAMPLES / "receiver.toml").read_text() + (EXAMPLES / "source.toml").read_text()
    documented = set(re.findall(r"^#?\s*([a-z_]+)\s*=", docs, re.M))
    documented |= set(re.findall(r"\b([a-z_]+)\s*=", docs))  # inline tables: keep = {last = ...}
    missing = sorted(keys - documented - tables)
    assert not missing, f"config keys missing from deploy/examples/*.toml: {missing}"


def _certs(out: Path, *args: str, clients: str = "host1") -> None:
    r = subprocess.run(["sh", str(DEPLOY / "make-certs.sh"), str(out), *args], capture_output=True,
                       text=True, timeout=60, env={"PATH": "/usr/bin:/bin:/usr/local/bin",
                                                   "CLIENTS": clients})
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_make_certs_makes_certificates_the_receiver_accepts(tmp_path: Path, daemons) -> None:
    pki, other = tmp_path / "pki", tmp_path / "other"
    _certs(pki, "localhost", "127.0.0.1", clients="host1 host2")
    _certs(other, "localhost", "127.0.0.1")  # another CA: its client certificate must not pass
    for name in ("ca.key", "receiver.key", "host1.key", "host2.key"):
        assert (pki / name).stat().st_mode & 0o077 == 0, name
    ca_before = (pki / "ca.crt").read_bytes()
    _certs(pki, "localhost", clients="host3")  # adding a client keeps the CA
    assert (pki / "ca.crt").read_bytes() == ca_before and (pki / "host3.crt").exists()
    r = subprocess.run(["sh", str(DEPLOY / "make-certs.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr

    rx_tls = (f'[receiver.tls]\ncert = "{pki}/receiver.crt"\nkey = "{pki}/receiver.key"\n'
              f'client_ca = "{pki}/ca.crt"\n')
    env = write_env(tmp_path / "env", receiver_extra=rx_tls,
                    source_extra=f'[source.tls]\nca = "{pki}/ca.crt"\ncert = "{pki}/host1.crt"\n'
                                 f'key = "{pki}/host1.key"\nserver_name = "localhost"\n')
    make_image(env.source.images["vol1"], 4 * MiB, random.Random(1))
    rx = daemons.receiver(env)
    src = daemons.source(env)
    wait_converged(env, "vol1", time.time(), src, rx)
    assert_replica_equal(env, "vol1")
    src.stop()

    # the same source with a client certificate from another CA gets nowhere
    toml = env.source.toml
    toml.write_text(toml.read_text().replace(f'cert = "{pki}/host1.crt"', f'cert = "{other}/host1.crt"')
                    .replace(f'key = "{pki}/host1.key"', f'key = "{other}/host1.key"'))
    epoch = env.replica_state("vol1")["epoch"]
    before = rx.log_text().count("client authenticated")
    bad = daemons.source(env)
    wait_for(lambda: "receiver unreachable" in bad.log_text() or "refused" in bad.log_text(),
             scaled(30), what="the source with a foreign certificate to be refused")
    assert rx.log_text().count("client authenticated") == before
    assert env.replica_state("vol1")["epoch"] == epoch
    bad.stop()
    assert rx.running
    rx.stop()


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def test_systemd_units_are_hardened_and_restart(tmp_path: Path) -> None:
    units = DEPLOY / "systemd"
    for name in ("cdp-receiver.service", "cdp-source.service", "cdp-archive@.service"):
        u = _unit(units / name)
        s = u["Service"]
        assert s["ExecStart"].startswith("/opt/cdp/bin/cdp "), name  # the venv of deploy/README.md
        assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict", name
        assert s.get("ReadWritePaths"), name
        assert s["PrivateTmp"] == "yes" and s["RestrictNamespaces"] == "yes", name
        if name != "cdp-archive@.service":
            assert s["Restart"] == "on-failure" and "WantedBy" in u["Install"], name
    assert _unit(units / "cdp-receiver.service")["Service"]["User"] == "cdp"
    archive = _unit(units / "cdp-archive@.service")["Service"]
    assert archive["User"] == "cdp" and archive["Type"] == "oneshot"
    assert "archive run" in archive["ExecStart"] and "--archive %i" in archive["ExecStart"]
    timer = _unit(units / "cdp-archive@.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"
    assert "u cdp " in (DEPLOY / "sysusers.d" / "cdp.conf").read_text()
    analyze, cdp = shutil.which("systemd-analyze"), shutil.which("cdp")
    if analyze and cdp:  # systemd's own checks, with ExecStart pointed at this cdp
        out = tmp_path / "units"
        out.mkdir()
        for f in units.iterdir():
            (out / f.name.replace("@.", "@x.")).write_text(
                f.read_text().replace("/opt/cdp/bin/cdp", cdp))
        r = subprocess.run([analyze, "verify", *map(str, sorted(out.iterdir()))],
                           capture_output=True, text=True, timeout=60)
        bad = [line for line in (r.stdout + r.stderr).splitlines()
               if "Unknown key" in line or "Unknown section" in line or "Invalid" in line
               or "Failed to parse" in line]
        assert not bad, "\n".join(bad)


def _metric_names() -> set[str]:
    """Every metric family the daemons export (collected from idle daemon stand-ins)."""
    from types import SimpleNamespace

    from cdp.metrics import ReceiverMetrics, SourceMetrics
    from cdp.status import ReceiverStatus, SourceStatus

    rx = SimpleNamespace(status=lambda now=None: ReceiverStatus(0.0, "", "", 0, ()))
    src = SimpleNamespace(status=lambda: SourceStatus("src"))
    names = set()
    for m in (ReceiverMetrics(rx), SourceMetrics(src)):
        names |= {fam.name for fam in m.registry.collect()}
    return names


def _known(name: str, known: set[str]) -> bool:
    base = re.sub(r"_(total|bucket|count|sum)$", "", name)
    return name in known or base in known


def test_monitoring_files_refer_to_real_metrics(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    known = _metric_names()
    assert "cdp_receiver_lag_seconds" in known
    dash = json.loads((DEPLOY / "grafana" / "cdp-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {n for e in exprs for n in re.findall(r"\b((?:cdp|process)_[a-z_]+)", e)}
    assert len(used) > 10
    unknown = sorted(n for n in used if not _known(n, known))
    assert not unknown, f"dashboard or alerts use metrics cdp does not export: {unknown}"
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in prom["scrape_configs"]}
    assert jobs == {"cdp-receiver", "cdp-source"}
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {"receiver", "source", "seaweedfs", "prometheus"} <= set(compose["services"])
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "host1.token").write_text("0123456789abcdef0123456789abcdef\n")
    (secrets / "host1.token").chmod(0o600)
    for name, load in (("receiver.toml", load_receiver), ("source.toml", load_source)):
        text = (DEPLOY / "compose" / name).read_text().replace("/etc/cdp/secrets/", f"{secrets}/")
        (tmp_path / name).write_text(text)
        assert load(tmp_path / name).metrics_listen is not None  # the compose configs load too


def test_metrics_ports_agree_everywhere() -> None:
    """Receiver metrics on 9740, source metrics on 9750: examples, compose, Prometheus, READMEs."""
    yaml = pytest.importorskip("yaml")

    def port(path: Path) -> int:
        m = re.search(r'^metrics_listen = "[^"]*:(\d+)"', path.read_text(), re.M)
        assert m, path
        return int(m.group(1))

    for side, want in (("receiver", 9740), ("source", 9750)):
        assert port(EXAMPLES / f"{side}.toml") == want, side
        assert port(DEPLOY / "compose" / f"{side}.toml") == want, side
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    assert targets == {"cdp-receiver": ["receiver:9740"], "cdp-source": ["source:9750"]}
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    readme = " ".join(" ".join(p.read_text() for p in docs).split())
    assert "`[receiver]` (port 9740" in readme and "`[source]` (port 9750" in readme
    deploy = " ".join((DEPLOY / "README.md").read_text().split())
    assert "9740 and 9750 (Prometheus metrics of receiver and source" in deploy
