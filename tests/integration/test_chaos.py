"""Chaos: link faults of every kind, both ways, and SIGKILLs of both daemons, under load.

First the fault proxy itself (tests/faultproxy.py) against an echo server: each kind does
what it says, and reports when the link is healthy again. Then a bounded, seeded run with a
real receiver and source (tests/chaosrig.py) replicating a scan volume and an nbd volume
with the shipped liveness and retry defaults: while writers keep rewriting random blocks,
the proxy injects one fault of each kind (short ones: the suite must stay fast; the long
soak is bench/chaos_soak.py), and the receiver and the source are each SIGKILLed once during
a fault and started again. Then writes stop and the link heals, and:

- both replicas converge and hash equal to their source images;
- `cdp verify --replica` finds image and hash map in agreement (exit 0);
- no acknowledged epoch was lost: sampled all along, a replica's epoch never went back and
  never fell below an epoch the source had reported acknowledged;
- the receiver never refused the client's own volumes as `busy` (session takeover).
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from chaosrig import ChaosRig
from faultproxy import FAULT_KINDS, FaultPlan, FaultProxy, plan_faults
from helpers import MiB, scaled, wait_for

SEED = 12

# -- the proxy against an echo server -----------------------------------------------------


class _Echo:
    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.socks.append(c)
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := c.recv(1 << 16):
                c.sendall(data)
        c.close()

    def close(self) -> None:
        for s in [self.srv, *self.socks]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def echo_proxy():
    echo = _Echo()
    proxy = FaultProxy(echo.port)
    yield proxy
    proxy.close()
    echo.close()


def _connect(proxy: FaultProxy) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", proxy.port), 5)
    c.settimeout(scaled(5))
    return c


def _roundtrip(c: socket.socket, n: int = 1000) -> bool:
    """True if n bytes come back; False if nothing came back within 0.5 s (a dead path)."""
    c.sendall(b"x" * n)
    got = 0
    c.settimeout(0.5)
    try:
        while got < n:
            data = c.recv(1 << 16)
            if not data:
                raise EOFError("closed")
            got += len(data)
    except TimeoutError:
        return False
    finally:
        c.settimeout(scaled(5))
    return True


def test_reset_cuts_a_chunk_in_half_and_resets(echo_proxy: FaultProxy) -> None:
    c = _connect(echo_proxy)
    assert _roundtrip(c) and echo_proxy.live() == 1
    fault = echo_proxy.inject("reset", "up")
    c.sendall(b"y" * 10_000)
    with pytest.raises(ConnectionResetError):
        while c.recv(1 << 16):
            pass
    assert fault.wait(scaled(5)) >= fault.started and fault.partial is True
    assert fault.connections == 1 and echo_proxy.faults["reset"] == 1
    assert _roundtrip(_connect(echo_proxy)), "new connections pass at once"


def test_inject_at_resets_once_that_many_bytes_went_up(echo_proxy: FaultProxy) -> None:
    c = _connect(echo_proxy)
    trigger = echo_proxy.inject_at(20_000, "reset", "up")
    assert _roundtrip(c) and not trigger.fired  # 1000 bytes up: not yet
    c.sendall(b"y" * 40_000)
    with pytest.raises(ConnectionResetError):
        while c.recv(1 << 16):
            pass
    fault = trigger.wait(scaled(5))
    assert fault.wait(scaled(5)) >= fault.started and fault.connections == 1
    assert echo_proxy.faults["reset"] == 1 and 20_000 <= echo_proxy.up < 41_000
    assert _roundtrip(_connect(echo_proxy)), "it fires once: new connections pass"
    late = echo_proxy.inject_at(0, "fin", "both")  # already due: fires at once
    assert late.fired and late.wait(0).kind == "fin"


def test_rcvbuf_is_set_on_accepted_client_sockets() -> None:
    echo = _Echo()
    proxy = FaultProxy(echo.port, rcvbuf=64 * 1024)
    try:
        c = _connect(proxy)
        assert _roundtrip(c)
        with proxy._lock:
            client = proxy._conns[0].client
        # Linux doubles what is asked (bookkeeping overhead) and never gives less
        assert 64 * 1024 <= client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 256 * 1024
        c.close()
    finally:
        proxy.close()
        echo.close()


def test_reset_of_an_idle_direction_still_happens(echo_proxy: FaultProxy) -> None:
    c = _connect(echo_proxy)
    assert _roundtrip(c)
    fault = echo_proxy.inject("reset", "down")  # nothing flows down unless we send
    fault.wait(scaled(5))
    assert fault.partial is False
    with pytest.raises((ConnectionResetError, EOFError, BrokenPipeError)):
        _roundtrip(c)


@pytest.mark.parametrize("direction", ["up", "down", "both"])
def test_fin_closes_cleanly(echo_proxy: FaultProxy, direction: str) -> None:
    c = _connect(echo_proxy)
    assert _roundtrip(c)
    fault = echo_proxy.inject("fin", direction)
    assert fault.healthy and fault.connections == 1
    assert c.recv(10) == b""  # an orderly end of stream, passed on by the echo's reaction


def test_blackhole_forgets_connections_for_good(echo_proxy: FaultProxy) -> None:
    old = _connect(echo_proxy)
    assert _roundtrip(old)
    fault = echo_proxy.inject("blackhole", "both", 1.5)
    assert not fault.healthy
    during = _connect(echo_proxy)  # accepted, then dark too
    assert not _roundtrip(during)
    assert echo_proxy.live() == 0
    healthy = fault.wait(scaled(10))
    assert healthy == pytest.approx(fault.started + 1.5)
    assert fault.healthy_wall == pytest.approx(fault.started_wall + 1.5, abs=0.05)
    assert _roundtrip(_connect(echo_proxy)), "after the window new connections pass"
    assert not _roundtrip(old) and not _roundtrip(during), "forgotten connections stay dead"


@pytest.mark.parametrize("dead", ["up", "down"])
def test_halfopen_kills_one_direction(echo_proxy: FaultProxy, dead: str) -> None:
    c = _connect(echo_proxy)
    assert _roundtrip(c)
    # the pumps count a chunk just after forwarding it: let the echo's count land
    wait_for(lambda: echo_proxy.up == echo_proxy.down == 1000, 5, interval=0.01,
             what="the proxy to count the echo")
    before = echo_proxy.up, echo_proxy.down
    fault = echo_proxy.inject("halfopen", dead, 1.0)
    assert not _roundtrip(c)
    fault.wait(scaled(10))
    assert not _roundtrip(c)
    if dead == "down":  # the bytes still went up, the echo never came back
        assert echo_proxy.up > before[0] and echo_proxy.down == before[1]
    else:
        assert echo_proxy.up == before[0]
    assert _roundtrip(_connect(echo_proxy))


@pytest.mark.parametrize("direction", ["up", "down", "both"])
def test_stall_holds_then_resumes_the_same_connection(echo_proxy: FaultProxy,
                                                      direction: str) -> None:
    c = _connect(echo_proxy)
    assert _roundtrip(c)
    fault = echo_proxy.inject("stall", direction, 1.5)
    late = _connect(echo_proxy)  # a connection made during the stall stalls too
    assert not _roundtrip(c, 100)
    fault.wait(scaled(10))
    got = 0
    while got < 100:  # what was sent during the stall arrives, on the same connection
        got += len(c.recv(1 << 16))
    assert got == 100 and _roundtrip(c) and _roundtrip(late)


def test_ratecap_limits_the_bytes_forwarded(echo_proxy: FaultProxy) -> None:
    c = _connect(echo_proxy)
    assert _roundtrip(c)
    rate = 64 * 1024
    fault = echo_proxy.inject("ratecap", "up", 2.0, rate=rate)
    up0 = echo_proxy.up
    t0 = time.monotonic()
    sender = threading.Thread(target=lambda: c.sendall(b"z" * (1 << 20)), daemon=True)
    sender.start()
    time.sleep(1.0)
    elapsed = time.monotonic() - t0
    # a byte bound, not a duration: a slow machine forwards less, never more
    assert echo_proxy.up - up0 <= rate * elapsed + 2 * 16 * 1024
    fault.wait(scaled(10))
    got = 0
    while got < (1 << 20):
        got += len(c.recv(1 << 20))
    sender.join(scaled(10))
    assert _roundtrip(c)


def test_calm_heals_everything_and_close_leaves_no_threads() -> None:
    echo = _Echo()
    proxy = FaultProxy(echo.port)
    c = _connect(proxy)
    faults = [proxy.inject("stall", "both", 30), proxy.inject("ratecap", "down", 30, rate=1000),
              proxy.inject("blackhole", "both", 30)]
    proxy.calm()
    assert all(f.healthy for f in faults)
    assert _roundtrip(_connect(proxy))
    proxy.inject("halfopen", "up", 30)  # live connections dark while close() runs
    proxy.close()
    c.close()
    echo.close()
    left = [t.name for t in threading.enumerate() if t.name.startswith("faultproxy")]
    assert not left


def test_seeded_schedule_covers_every_kind_and_repeats() -> None:
    plans = plan_faults(7, 14, stall=(1, 3))
    assert plans == plan_faults(7, 14, stall=(1, 3))
    assert {p.kind for p in plans[:len(FAULT_KINDS)]} == set(FAULT_KINDS)
    assert all(1 <= p.duration <= 3 for p in plans if p.kind == "stall")
    with pytest.raises(ValueError):
        FaultPlan("halfopen", "both", 2)


# -- real daemons --------------------------------------------------------------------------


def test_scan_and_nbd_replicas_survive_every_fault_and_kills(tmp_path: Path, daemons) -> None:
    rng = random.Random(SEED)
    plans = plan_faults(rng, len(FAULT_KINDS), stall=(1, 3), blackhole=(2, 4),
                        halfopen=(2, 4), ratecap=(2, 4), rate=(64 * 1024, 256 * 1024))
    kills = dict(zip(rng.sample(range(len(plans)), 2), ("receiver", "source"), strict=True))
    steps: list[str] = []
    rig = ChaosRig(tmp_path / "env", ("scan", "nbd"), seed=SEED, size=8 * MiB, daemons=daemons,
                   log=steps.append)
    try:
        rig.start()
        rig.start_load()
        for i, plan in enumerate(plans):
            rig.wait_link(30)  # not asserted: the end result is
            time.sleep(rng.uniform(0.1, 1.0))  # land at a random point of the stream
            fault = rig.inject(plan)
            if i in kills:  # meanwhile, a daemon dies
                time.sleep(rng.uniform(0, min(1.0, plan.duration)))
                rig.kill(kills[i])
            fault.wait(scaled(30))
            # pace the next fault after this one's recovery (not asserted, see the soak)
            r = rig.measure_resume(plan.kind, plan.describe(), fault.healthy_at or 0.0,
                                   fault.healthy_wall or 0.0, timeout=30)
            steps.append(f"  resumed after {r.resume_s} s, fresh after {r.fresh_s} s")
        rig.stop_load()
        rig.proxy.calm()
        identical = rig.converge(timeout=120)
        trace = "\n".join(steps)
        print(trace)  # shown with -s, and by pytest when the test fails

        assert all(identical.values()), f"replica differs from source: {identical}\n{trace}"
        rc, results, err = rig.verify_replica()
        assert rc == 0 and results is not None, f"cdp verify --replica exited {rc}: {err}"
        assert {r["volume"] for r in results} == set(rig.volumes)
        assert all(r["equal"] and not r["differing"] for r in results), results
        assert rig.samples > 100 and not rig.violations, rig.violations
        busy = rig.busy_refusals()
        assert not busy, "the receiver refused the client's own volumes:\n" + "\n".join(busy)
        assert set(rig.proxy.faults) >= set(FAULT_KINDS), rig.proxy.faults
        assert rig.kills == {"receiver": 1, "source": 1}
        assert all(rig.written.values()) and rig.rx.running and rig.src.running
    finally:
        rig.close()
