"""Connections that never authenticate: the receiver closes them after auth_timeout, and caps
how many one address may hold at once (max_unauthenticated_per_ip), so idle TCP connections
cannot hold every max_connections slot and lock the sources out."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import socket
import threading
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
    write_random_blocks,
)

from cdp.config import load_receiver
from cdp.wire.frames import FrameDecoder, encode
from cdp.wire.messages import PROTOCOL_VERSION, Error, Hello

VOL = "vol1"
ATTACKER = "127.0.0.2"  # idle connections come from here; the source from 127.0.0.1
AUTH_TIMEOUT = 2.0
PER_IP = 4
MAX_CONNECTIONS = 8  # without the per-address cap, the idle connections would take them all


def _idle(port: int, hello: bool = False) -> tuple[socket.socket, float]:
    s = socket.socket()
    s.bind((ATTACKER, 0))
    s.settimeout(scaled(AUTH_TIMEOUT + 10))
    s.connect(("127.0.0.1", port))
    if hello:  # half a handshake, then nothing
        s.sendall(encode(Hello(PROTOCOL_VERSION, "host1", os.urandom(32))))
    return s, time.monotonic()


def _until_closed(s: socket.socket) -> tuple[float, list[str]]:
    """Read until the receiver closes; (when, the codes of the Error frames it sent)."""
    dec = FrameDecoder()
    codes: list[str] = []
    with contextlib.suppress(ConnectionResetError):
        while data := s.recv(65536):
            codes += [m.code for m in dec.feed(data) if isinstance(m, Error)]
    s.close()
    return time.monotonic(), codes


def _loopback_alias_works() -> bool:
    try:
        with socket.socket() as s:
            s.bind((ATTACKER, 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _loopback_alias_works(),
                                reason=f"cannot bind {ATTACKER} (no 127.0.0.0/8 on lo)")


def test_config_defaults_and_keys(tmp_path: Path) -> None:
    (tmp_path / "receiver.toml").write_text('[receiver]\nlisten = "127.0.0.1:7400"\n')
    cfg = load_receiver(tmp_path / "receiver.toml")
    assert (cfg.auth_timeout, cfg.max_unauthenticated_per_ip) == (10.0, 8)
    (tmp_path / "receiver.toml").write_text('[receiver]\nauth_timeout = "3s"\n'
                                            "max_unauthenticated_per_ip = 2\n")
    cfg = load_receiver(tmp_path / "receiver.toml")
    assert (cfg.auth_timeout, cfg.max_unauthenticated_per_ip) == (3.0, 2)


def test_idle_connections_are_closed_and_capped_while_a_source_replicates(cdp_env,
                                                                          daemons) -> None:
    env = cdp_env(receiver_extra=f'auth_timeout = "{AUTH_TIMEOUT}s"\n'
                                 f"max_unauthenticated_per_ip = {PER_IP}\n"
                                 f"max_connections = {MAX_CONNECTIONS}")
    image = env.source.images[VOL]
    make_image(image, 8 * MiB, random.Random(1))
    rx = daemons.receiver(env)

    # 1. more idle connections than the cap, at once: PER_IP are held for auth_timeout, the rest
    #    refused at once ("busy"); after auth_timeout the held ones are closed ("auth_timeout")
    conns = [_idle(env.port, hello=i % 2 == 1) for i in range(3 * PER_IP)]
    with concurrent.futures.ThreadPoolExecutor(len(conns)) as pool:  # each read in parallel
        closed = list(pool.map(_until_closed, [s for s, _ in conns]))
    results = [(c, opened) for c, (_, opened) in zip(closed, conns, strict=True)]
    held = [(t - t0, codes) for (t, codes), t0 in results if "busy" not in codes]
    refused = [(t - t0, codes) for (t, codes), t0 in results if "busy" in codes]
    assert len(held) == PER_IP and len(refused) == 2 * PER_IP, (held, refused)
    for took, codes in held:
        assert codes == ["auth_timeout"], codes
        assert AUTH_TIMEOUT * 0.9 <= took <= scaled(AUTH_TIMEOUT + 3), took
    assert all(took < scaled(AUTH_TIMEOUT) for took, _ in refused), refused

    # 2. an attacker keeps the cap full the whole time; a real source still connects, seeds and
    #    replicates a change
    stop = threading.Event()
    opened = [0]

    def attack() -> None:
        live: list[socket.socket] = []
        while not stop.is_set():
            for s in list(live):
                s.setblocking(False)
                try:
                    if s.recv(65536) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                s.close()
                live.remove(s)
            while len(live) < 3 * PER_IP:
                with contextlib.suppress(OSError):
                    live.append(_idle(env.port, hello=opened[0] % 2 == 1)[0])
                    opened[0] += 1
            time.sleep(0.05)
        for s in live:
            s.close()

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    try:
        wait_for(lambda: opened[0] >= 3 * PER_IP, 10, what="the attacker's connections")
        src = daemons.source(env)
        wait_converged(env, VOL, time.time(), src, rx, timeout=60)
        assert_replica_equal(env, VOL)
        write_random_blocks(image, [1, 50, 99], random.Random(2))
        wait_converged(env, VOL, time.time(), src, rx, timeout=60)
        assert_replica_equal(env, VOL)
        assert opened[0] > 3 * PER_IP  # held ones were closed and replaced meanwhile
    finally:
        stop.set()
        attacker.join()
    assert src.log_text().count("connected to receiver") == 1  # never refused, never dropped
    log = rx.log_text()
    assert "not authenticated within 2s (auth_timeout)" in log
    assert "max_unauthenticated_per_ip" in log
    assert rx.running
    src.stop()
    rx.stop()


def test_tls_handshakes_count_as_unauthenticated(cdp_env, daemons, tmp_path: Path) -> None:
    """With TLS, a connection that never starts its handshake is held like any other stranger:
    capped per address (the rest refused in clear), closed after auth_timeout, and a real
    source still gets in over TLS."""
    from test_tls_hooks import make_pki

    pki = make_pki(tmp_path / "pki")
    env = cdp_env(receiver_extra=(f'auth_timeout = "{AUTH_TIMEOUT}s"\n'
                                  f"max_unauthenticated_per_ip = {PER_IP}\n"
                                  f'[receiver.tls]\ncert = "{pki["receiver_crt"]}"\n'
                                  f'key = "{pki["receiver_key"]}"'),
                  source_extra=f'[source.tls]\nca = "{pki["ca"]}"\nserver_name = "localhost"')
    make_image(env.source.images[VOL], 4 * MiB, random.Random(3))
    rx = daemons.receiver(env)
    conns = [_idle(env.port) for _ in range(2 * PER_IP)]
    with concurrent.futures.ThreadPoolExecutor(len(conns)) as pool:
        closed = list(pool.map(_until_closed, [s for s, _ in conns]))
    codes = [c for _, c in closed]
    assert sum(1 for c in codes if c == ["busy"]) == PER_IP, codes  # refused at once, in clear
    assert sum(1 for c in codes if c == []) == PER_IP, codes  # held, then dropped mid-handshake
    wait_for(lambda: "TLS handshake failed" in rx.log_text(), 10, what="the handshake timeout")
    since = time.time()
    src = daemons.source(env)
    wait_converged(env, VOL, since, src, rx, timeout=60)
    assert_replica_equal(env, VOL)
