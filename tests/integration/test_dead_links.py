"""Dead links: a connection that silently stops carrying anything, in both directions, without
being closed (a NAT that forgot it, a peer gone without RST). The source must notice within
dead_after (Ping/Pong answers while idle, acknowledgements while epochs are pending), drop the
connection, reconnect through a working path and resume; the replica ends byte-identical.

Also here: the Ping/Pong rules of the sans-I/O sessions, the dead_after config key, and TCP
keepalive on both sides' sockets."""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from helpers import (
    BS,
    MiB,
    assert_replica_equal,
    feed,
    free_port,
    make_image,
    scaled,
    sent,
    wait_converged,
    wait_for,
    write_random_blocks,
)

from cdp.config import load_source
from cdp.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from cdp.wire.frames import encode
from cdp.wire.messages import Ping, Pong
from cdp.wire.receiver_session import ReceiverSession
from cdp.wire.session import MAX_UNANSWERED
from cdp.wire.source_session import SourceSession
from cdp.wire.transport import TCP_KEEPALIVE, tcp_keepalive

VOL = "vol1"
TOKEN = b"0123456789abcdef0123456789abcdef"
KEEPALIVE, DEAD_AFTER = 0.5, 2.0
WARNING = "dead link: nothing received from the receiver"


# -- the sessions: Ping / Pong --------------------------------------------------------------


def _ready() -> tuple[SourceSession, ReceiverSession]:
    src = SourceSession("host1", TOKEN)
    rcv = ReceiverSession({"host1": (TOKEN, ("vm1",))}.get)
    src.start()
    feed(rcv, sent(src))
    rcv.challenge()
    feed(src, sent(rcv))
    src.auth()
    feed(rcv, sent(src))
    rcv.welcome()
    feed(src, sent(rcv))
    return src, rcv


def test_ping_is_answered_by_pong_in_order() -> None:
    src, rcv = _ready()
    assert feed(rcv, sent(src, Ping(1)) + sent(src, Ping(2))) == [Ping(1), Ping(2)]
    assert src.pings == [1, 2]
    with pytest.raises(LocalProtocolError):
        rcv.send(Pong(2))  # answers go in order
    assert feed(src, sent(rcv, Pong(1))) == [Pong(1)]
    assert feed(src, sent(rcv, Pong(2))) == [Pong(2)]
    assert src.pings == []
    with pytest.raises(LocalProtocolError):
        rcv.send(Pong(3))  # nothing asked


def test_unasked_pong_is_a_violation() -> None:
    src, _ = _ready()
    sent(src, Ping(7))
    with pytest.raises(RemoteProtocolError):
        feed(src, _frame(Pong(8)))


def test_ping_needs_authentication_and_is_bounded() -> None:
    src = SourceSession("host1", TOKEN)
    src.start()
    with pytest.raises(LocalProtocolError):
        src.send(Ping(1))
    rcv = ReceiverSession({"host1": (TOKEN, ("vm1",))}.get)
    with pytest.raises(RemoteProtocolError):
        feed(rcv, _frame(Ping(1)))  # before Hello / authentication
    src, rcv = _ready()
    for n in range(MAX_UNANSWERED):
        feed(rcv, sent(src, Ping(n)))
    with pytest.raises(LocalProtocolError):
        src.send(Ping(99))
    with pytest.raises(RemoteProtocolError):
        feed(rcv, _frame(Ping(99)))


def _frame(msg: Ping | Pong) -> bytes:
    return encode(msg)


# -- config and sockets ---------------------------------------------------------------------


def _source_toml(tmp_path: Path, extra: str) -> Path:
    token = tmp_path / "t.token"
    token.write_text(TOKEN.decode())
    token.chmod(0o600)
    (tmp_path / "v.raw").write_bytes(b"")
    path = tmp_path / "source.toml"
    path.write_text(f'[source]\nname = "h"\nreceiver = "127.0.0.1:1"\ntoken_file = "t.token"\n'
                    f'{extra}\n[[volume]]\nname = "v"\npath = "v.raw"\n')
    return path


def test_dead_after_defaults_to_three_keepalives_and_must_exceed_it(tmp_path: Path) -> None:
    assert load_source(_source_toml(tmp_path, "")).dead_after == 6.0  # keepalive 2 s
    assert load_source(_source_toml(tmp_path, 'keepalive = "10s"')).dead_after == 30.0
    cfg = load_source(_source_toml(tmp_path, 'keepalive = "10s"\ndead_after = "45s"'))
    assert (cfg.keepalive, cfg.dead_after) == (10.0, 45.0)
    for bad in ('keepalive = "10s"\ndead_after = "10s"', 'dead_after = "2s"',
                'dead_after = "0s"'):
        with pytest.raises(ConfigError, match=r"source\.dead_after"):
            load_source(_source_toml(tmp_path, bad))


def test_tcp_keepalive_is_set_with_its_timings() -> None:
    with socket.socket() as s:
        assert tcp_keepalive(s)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        for name, want in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), TCP_KEEPALIVE,
                              strict=True):
            if hasattr(socket, name):
                assert s.getsockopt(socket.IPPROTO_TCP, getattr(socket, name)) == want
    with socket.socket(socket.AF_UNIX) as u:
        assert not tcp_keepalive(u)  # not TCP: left alone
    assert not tcp_keepalive(None)


# -- real daemons through a link that goes dark -------------------------------------------


def _env(cdp_env, proxy: FaultProxy, port: int):
    # the receiver's idle_timeout is longer than dead_after: the source must notice by itself
    # (and the receiver lets go of the dead connection's volume a little later)
    return cdp_env(port=port, receiver_addr=f"127.0.0.1:{proxy.port}",
                   receiver_extra='idle_timeout = "6s"',
                   source_extra=f'keepalive = "{KEEPALIVE}s"\ndead_after = "{DEAD_AFTER}s"')


def _noticed(src, before: int) -> bool:
    if not src.running:
        raise AssertionError(f"source exited with {src.returncode}:\n{src.tail()}")
    return src.log_text().count(WARNING) > before


def test_idle_link_going_dark_is_noticed_and_replaced(cdp_env, daemons) -> None:
    """Nothing pending: only the Ping the keepalive sends expects an answer."""
    port = free_port()
    proxy = FaultProxy(port, seed=1)
    try:
        env = _env(cdp_env, proxy, port)
        image = env.source.images[VOL]
        make_image(image, 4 * MiB, random.Random(1))
        rx = daemons.receiver(env, inprocess=True)
        src = daemons.source(env, inprocess=True)
        wait_converged(env, VOL, time.time(), src, rx)
        time.sleep(scaled(2 * DEAD_AFTER))  # idle, yet alive: Pings are answered, nothing dropped
        assert WARNING not in src.log_text() and proxy.connections == 1

        assert proxy.blackhole() == 1
        wait_for(lambda: _noticed(src, 0), DEAD_AFTER + 4, what="the source to notice the dead link")
        wait_for(lambda: proxy.connections >= 2, 10, what="a new connection")
        write_random_blocks(image, [3, 17, 40], random.Random(2))
        wait_converged(env, VOL, time.time(), src, rx, timeout=60)
        assert_replica_equal(env, VOL)
        assert "nothing received from the receiver" in src.log_text()
        assert rx.running and src.running
    finally:
        proxy.close()


def test_link_going_dark_with_epochs_pending_is_noticed_and_resumed(cdp_env, daemons) -> None:
    """Epochs in flight when the link dies (the proxy stops reading: the source's sends block):
    the source drops the connection, reconnects and resumes; nothing is lost."""
    port = free_port()
    proxy = FaultProxy(port, seed=2)
    try:
        env = _env(cdp_env, proxy, port)
        size = 16 * MiB
        image = env.source.images[VOL]
        make_image(image, size, random.Random(3))
        rx = daemons.receiver(env, inprocess=True)
        src = daemons.source(env, inprocess=True)
        wait_converged(env, VOL, time.time(), src, rx)
        seeded = env.counters(VOL)

        stop = threading.Event()
        written = [0]
        wrng = random.Random(4)

        def load() -> None:
            while not stop.is_set():
                write_random_blocks(image, wrng.sample(range(size // BS), 4), wrng)
                written[0] += 4 * BS
                time.sleep(0.05)

        writer = threading.Thread(target=load, daemon=True)
        writer.start()
        try:
            time.sleep(1.0)
            assert proxy.blackhole() == 1
            # the writes go on: new epochs cannot be acknowledged on the dark link
            wait_for(lambda: _noticed(src, 0), DEAD_AFTER + 4,
                     what="the source to notice the dead link")
            wait_for(lambda: proxy.connections >= 2, 10, what="a new connection")
            time.sleep(1.0)
        finally:
            stop.set()
            writer.join()

        wait_converged(env, VOL, time.time(), src, rx, timeout=90)
        assert_replica_equal(env, VOL)
        assert rx.running and src.running
        after = env.counters(VOL)
        assert after["logical"] - seeded["logical"] <= written[0], (after, seeded, written)
    finally:
        proxy.close()


def test_a_slow_link_with_buffered_data_is_not_taken_for_dead(cdp_env, daemons) -> None:
    """Several seconds of data in the buffers (longer than dead_after): the Pongs come late, but
    the receiver's end keeps acknowledging bytes, so the source does not drop the link."""
    port = free_port()
    # about 1 MiB/s toward the receiver (answers at full speed), for the whole test; a small
    # receive buffer at the proxy keeps the backlog in the source's send buffer, as on a slow wire
    proxy = FaultProxy(port, rcvbuf=64 * 1024)
    proxy.inject("ratecap", "up", duration=3600, rate=1 * MiB)
    try:
        env = _env(cdp_env, proxy, port)
        image = env.source.images[VOL]
        with open(image, "wb") as fh:  # incompressible: 8 MiB really cross the slow link
            fh.write(random.Random(5).randbytes(8 * MiB))
        rx = daemons.receiver(env, inprocess=True)
        src = daemons.source(env, inprocess=True)
        wait_converged(env, VOL, time.time(), src, rx, timeout=60)
        assert_replica_equal(env, VOL)
        assert WARNING not in src.log_text()
        assert proxy.connections == 1 and src.log_text().count("connected to receiver") == 1
    finally:
        proxy.close()
