"""A fault-injecting TCP proxy for tests: 127.0.0.1:port -> 127.0.0.1:target.

"up" is client -> target (source -> receiver), "down" the other way. Two ways to use it.

On demand, `inject(kind, direction, duration, rate)` (or `inject(FaultPlan)`), one fault on
the link now, from a seeded schedule if you like (`plan_faults(seed, n)`):

- reset:     forward only the first half of the next chunk in `direction`, then RST both
             sides (SO_LINGER 0): a frame cut in half on the wire;
- fin:       close with FIN: toward the receiver ("up"), toward the source ("down"), or both
             sockets at once ("both"); a half-close is passed on as the peers react to it;
- blackhole: both directions of every live connection stop forwarding, no socket closed (a
             NAT that forgot the connection, a peer gone without RST). Such a forgotten
             connection stays dead for good. For `duration` seconds new connections are
             accepted but go dark the same way; afterwards new connections pass;
- halfopen:  the same for one direction only, the other keeps forwarding;
- stall:     nothing is forwarded in `direction` for `duration` seconds (1-30 s), on every
             connection, new ones too; then the same connections go on with what was buffered;
- ratecap:   at most `rate` bytes/s in `direction` (the whole link) for `duration` seconds.

`inject_at(nbytes, ...)` injects the same fault later, once `nbytes` have been forwarded in
`count`'s direction ("up" by default, every connection together): a reset half way through a
transfer. It returns a `Trigger`; `Trigger.fault` is the Fault once it fired.

`inject` returns a `Fault` at once; `Fault.wait()` returns the moment (time.monotonic()) the
link is healthy again: for reset and fin when the connections were cut, for the others when
`duration` ends. `healthy_wall` is the same moment on the time.time() clock (the clock of
epoch times). `faults` counts injected faults per kind, `history` keeps them all, `live()`
counts connections no fault has touched. `up` and `down` count the bytes forwarded each way
(every connection together), `connections` the connections accepted. A ratecap with a long
duration, injected before anything connects, is a slow link for the whole test; `rcvbuf` (a
constructor argument) sets SO_RCVBUF on each accepted client socket, so that a slow link's
backlog waits in the sender's buffers rather than the proxy's.

In the background, `start_chaos()` (the older tests' mode): a seeded random schedule picks a
live connection every `interval` seconds (on average) and does one of `kinds`:

- drop:  close both sides cleanly (FIN), as a restarted middlebox would;
- reset: close both sides with RST (SO_LINGER 0), nothing flushed;
- cut:   forward only the first half of the next chunk in one direction, then
         reset both sides: a frame cut in half on the wire;
- stall: forward nothing in either direction for 0.3-2 s (the kernel buffers
         fill, the senders block), then go on;
and every chunk is delayed by 0..`delay` seconds (latency, jitter).

`calm()` ends everything: chaos, delays, stalls, caps and black-hole windows (connections
already forgotten stay dead). `blackhole()` makes every live connection go dark for good, new
connections pass. `close()` tears down the listener, every connection and every thread.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHUNK = 16 * 1024  # small reads: a cut lands inside a frame, not between frames
KINDS = ("drop", "reset", "cut", "stall")  # start_chaos()
FAULT_KINDS = ("reset", "fin", "blackhole", "halfopen", "stall", "ratecap")  # inject()
DURATION_KINDS = frozenset({"blackhole", "halfopen", "stall", "ratecap"})
UP, DOWN = 0, 1
DIRS = {"up": (UP,), "down": (DOWN,), "both": (UP, DOWN)}
# which directions make sense for each kind (a black hole is both ways; one way is halfopen)
DIRECTIONS = {"reset": ("up", "down"), "fin": ("up", "down", "both"), "blackhole": ("both",),
              "halfopen": ("up", "down"), "stall": ("up", "down", "both"),
              "ratecap": ("up", "down", "both")}
CUT_WAIT = 1.0  # a reset waits this long for a chunk to cut in half, then resets anyway
_POLL_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


@dataclass(frozen=True)
class FaultPlan:
    """One fault to inject: `duration` for the duration kinds, `rate` (bytes/s) for ratecap."""

    kind: str
    direction: str = "both"
    duration: float = 0.0
    rate: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}, expected one of {FAULT_KINDS}")
        if self.direction not in DIRECTIONS[self.kind]:
            raise ValueError(f"{self.kind}: direction {self.direction!r}, expected one of "
                             f"{DIRECTIONS[self.kind]}")
        if self.kind in DURATION_KINDS and self.duration <= 0:
            raise ValueError(f"{self.kind} needs a duration")
        if self.kind == "ratecap" and self.rate <= 0:
            raise ValueError("ratecap needs a rate (bytes/s)")

    def describe(self) -> str:
        s = f"{self.kind} {self.direction}"
        if self.kind in DURATION_KINDS:
            s += f" {self.duration:.1f}s"
        if self.kind == "ratecap":
            s += f" {self.rate // 1024} KiB/s"
        return s


@dataclass
class Fault:
    """An injected fault and when the link was healthy again."""

    plan: FaultPlan
    started: float  # time.monotonic()
    started_wall: float  # time.time()
    connections: int = 0  # connections it touched when injected
    healthy_at: float | None = None  # time.monotonic(); None until then
    healthy_wall: float | None = None
    partial: bool | None = None  # reset: whether a chunk was really cut in half
    _event: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pending: int = 0

    @property
    def kind(self) -> str:
        return self.plan.kind

    @property
    def healthy(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> float:
        """Block until the link is healthy again; that moment, on the monotonic clock."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"{self.plan.describe()}: still not healed after {timeout} s")
        assert self.healthy_at is not None
        return self.healthy_at

    def _heal(self, at: float | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            now, wall = time.monotonic(), time.time()
            at = now if at is None else min(at, now)
            self.healthy_at, self.healthy_wall = at, wall - (now - at)
            self._event.set()

    def _one_done(self, partial: bool) -> None:
        """A reset/fin of one of its connections happened: healed once all of them did."""
        with self._lock:
            self._pending -= 1
            self.partial = partial if self.partial is None else (self.partial and partial)
            done = self._pending <= 0
        if done:
            self._heal()


@dataclass
class Trigger:
    """A fault armed by `inject_at`: injected once `at` bytes went `count`'s way."""

    plan: FaultPlan
    count: int  # UP or DOWN
    at: int
    fault: Fault | None = None  # set when it fired
    _event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def fired(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Fault:
        """Block until it fired; the Fault it injected."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"{self.plan.describe()} at {self.at} bytes: not fired after "
                               f"{timeout} s")
        assert self.fault is not None
        return self.fault


def plan_faults(seed: int | random.Random, n: int, *, kinds: tuple[str, ...] = FAULT_KINDS,
                stall: tuple[float, float] = (1.0, 30.0),
                blackhole: tuple[float, float] = (2.0, 20.0),
                halfopen: tuple[float, float] = (2.0, 20.0),
                ratecap: tuple[float, float] = (2.0, 20.0),
                rate: tuple[int, int] = (64 * 1024, 1024 * 1024)) -> list[FaultPlan]:
    """A seeded random schedule of `n` faults. Every run of len(kinds) faults holds each kind
    once (shuffled), so n >= len(kinds) covers them all. Durations are uniform in the ranges."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    spans = {"stall": stall, "blackhole": blackhole, "halfopen": halfopen, "ratecap": ratecap}
    out: list[FaultPlan] = []
    while len(out) < n:
        batch = list(kinds)
        rng.shuffle(batch)
        for kind in batch[:n - len(out)]:
            direction = rng.choice(DIRECTIONS[kind])
            duration = round(rng.uniform(*spans[kind]), 2) if kind in spans else 0.0
            r = rng.randint(*rate) if kind == "ratecap" else 0
            out.append(FaultPlan(kind, direction, duration, r))
    return out


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.lock = threading.Lock()
        self.stalled_until = 0.0  # start_chaos() stalls: this connection, both ways
        self.cut = False  # start_chaos() cut: the next chunk either way
        self.cuts: list[Fault | None] = [None, None]  # inject("reset"): per direction
        self.dead = [False, False]  # forgotten in that direction: never forwards again
        self.done = [False, False]  # that direction's pump has ended
        self.fin = False  # half-closed by inject("fin")
        self.closed = threading.Event()

    @property
    def touched(self) -> bool:
        return self.closed.is_set() or self.fin or any(self.dead)


class FaultProxy:
    def __init__(self, target_port: int, *, seed: int = 0, interval: float = 1.0,
                 delay: float = 0.01, kinds: tuple[str, ...] = KINDS,
                 rcvbuf: int | None = None) -> None:
        self.target = target_port
        self.rcvbuf = rcvbuf
        self.rng = random.Random(seed)
        self.interval = interval
        self.delay = delay
        self.kinds = kinds
        self.chaos = False
        self.faults: Counter[str] = Counter()
        self.history: list[Fault] = []
        self.connections = 0
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        self._stop = threading.Event()
        # link-wide state of the inject() faults, per direction; all "until" are monotonic
        self._dead_until = [0.0, 0.0]  # black hole / half-open window: new connections go dark
        self._stall_until = [0.0, 0.0]
        self._rate: list[float] = [0.0, 0.0]
        self._rate_until = [0.0, 0.0]
        self._link_free = [0.0, 0.0]  # ratecap: when the capped link has sent what it took
        self._triggers: list[Trigger] = []  # inject_at(), not fired yet
        self._timers: list[threading.Timer] = []
        self._threads: list[threading.Thread] = []
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(16)
        self.port = self._srv.getsockname()[1]
        self._spawn(self._accept, "faultproxy-accept")
        self._spawn(self._chaos, "faultproxy-chaos")

    # -- control ---------------------------------------------------------------------

    def start_chaos(self) -> None:
        self.chaos = True

    def live(self) -> int:
        """Connections open and untouched by any black hole or half-open."""
        with self._lock:
            return sum(1 for c in self._conns if not c.touched)

    def inject(self, kind: str | FaultPlan, direction: str = "both", duration: float = 0.0,
               rate: int = 0) -> Fault:
        """Inject one fault now (see the module docstring); returns at once. The Fault's
        wait() gives the moment the link is healthy again."""
        plan = kind if isinstance(kind, FaultPlan) else FaultPlan(kind, direction, duration, rate)
        now = time.monotonic()
        fault = Fault(plan, now, time.time())
        dirs = DIRS[plan.direction]
        with self._lock:
            self.faults[plan.kind] += 1
            self.history.append(fault)
            live = [c for c in self._conns if not c.touched]
            if plan.kind in ("blackhole", "halfopen"):
                for d in dirs:
                    self._dead_until[d] = max(self._dead_until[d], now + plan.duration)
                for c in live:
                    for d in dirs:
                        c.dead[d] = True
            elif plan.kind == "stall":
                for d in dirs:
                    self._stall_until[d] = max(self._stall_until[d], now + plan.duration)
            elif plan.kind == "ratecap":
                for d in dirs:
                    self._rate[d] = float(plan.rate)
                    self._rate_until[d] = now + plan.duration
                    self._link_free[d] = now
            elif plan.kind == "reset":
                fault._pending = len(live)
                for c in live:
                    with c.lock:
                        c.cuts[dirs[0]] = fault
        fault.connections = len(live)
        if plan.kind in DURATION_KINDS:
            self._timer(plan.duration, fault._heal, now + plan.duration)
        elif plan.kind == "fin":
            for c in live:
                self._fin(c, plan.direction)
            fault._heal()
        elif not live:  # a reset with nothing to cut
            fault._heal()
        else:  # reset: the pumps cut the next chunk; an idle direction is reset anyway
            self._timer(CUT_WAIT, self._cut_overdue, fault)
        return fault

    def inject_at(self, nbytes: int, kind: str | FaultPlan, direction: str = "both",
                  duration: float = 0.0, rate: int = 0, *, count: str = "up") -> Trigger:
        """Inject a fault once `nbytes` have been forwarded `count`'s way ("up" or "down", all
        connections together; at once if they already were). Returns at once."""
        plan = kind if isinstance(kind, FaultPlan) else FaultPlan(kind, direction, duration, rate)
        if count not in ("up", "down"):
            raise ValueError(f"count: {count!r}, expected 'up' or 'down'")
        trigger = Trigger(plan, UP if count == "up" else DOWN, nbytes)
        with self._lock:
            self._triggers.append(trigger)
        self._fire_due()
        return trigger

    def _fire_due(self) -> None:
        with self._lock:
            done = (self.up, self.down)
            due = [t for t in self._triggers if done[t.count] >= t.at]
            self._triggers = [t for t in self._triggers if t not in due]
        for t in due:
            t.fault = self.inject(t.plan)
            t._event.set()

    def calm(self) -> None:
        """No more faults or delays; stalls, caps and black-hole windows in progress end now
        (connections already forgotten stay dead)."""
        self.chaos = False
        with self._lock:
            self._stall_until = [0.0, 0.0]
            self._rate_until = [0.0, 0.0]
            self._dead_until = [0.0, 0.0]
            pending = [f for f in self.history if not f.healthy]
            for c in self._conns:
                c.stalled_until = 0.0
                c.cut = False
                with c.lock:
                    c.cuts = [None, None]
        for f in pending:
            f._heal()

    def blackhole(self) -> int:
        """Stop forwarding on every live connection, both ways, for good, closing nothing: a
        NAT that forgot the connection, a peer gone without RST. New connections pass.
        Returns how many went dark."""
        with self._lock:
            live = [c for c in self._conns if not c.closed.is_set()]
            for c in live:
                c.dead = [True, True]
        self.faults["blackhole"] += len(live)
        return len(live)

    def close(self) -> None:
        """Stop everything: listener, timers, connections, threads; never hangs."""
        self._stop.set()
        self.chaos = False
        with contextlib.suppress(OSError):
            self._srv.shutdown(socket.SHUT_RDWR)  # wakes accept()
        with contextlib.suppress(OSError):
            self._srv.close()
        with self._lock:
            timers, conns = list(self._timers), list(self._conns)
        for t in timers:
            t.cancel()
        for c in conns:
            self._kill(c, rst=False)
        for f in self.history:
            f._heal()  # nobody waits forever on a fault of a closed proxy
        deadline = time.monotonic() + 5
        for th in list(self._threads):
            if th is not threading.current_thread():
                th.join(max(0.0, deadline - time.monotonic()))

    # -- plumbing --------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        th = threading.Thread(target=target, args=args, daemon=True, name=name)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(th)
        th.start()

    def _timer(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Timer(delay, fn, args)
        t.daemon = True
        with self._lock:
            self._timers = [x for x in self._timers if x.is_alive()]
            self._timers.append(t)
        if not self._stop.is_set():
            t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), 5)
                server.settimeout(None)  # the 5 s were for connecting: a quiet receiver is no fault
            except OSError:
                client.close()
                continue
            if self.rcvbuf is not None:
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            conn = _Conn(client, server)
            now = time.monotonic()
            with self._lock:
                if self._stop.is_set():
                    client.close()
                    server.close()
                    return
                conn.dead = [now < self._dead_until[UP], now < self._dead_until[DOWN]]
                self._conns.append(conn)
                self.connections += 1
            self._spawn(self._pump, "faultproxy-up", conn, UP)
            self._spawn(self._pump, "faultproxy-down", conn, DOWN)

    def _pump(self, conn: _Conn, d: int) -> None:
        a, b = (conn.client, conn.server) if d == UP else (conn.server, conn.client)
        try:
            while not conn.closed.is_set():
                if conn.dead[d]:
                    break
                data = a.recv(CHUNK)
                if not data:
                    break
                if not self._hold(conn, d):
                    break
                if self.chaos and self.delay:
                    time.sleep(self.rng.uniform(0, self.delay))
                with conn.lock:
                    cut, conn.cut = conn.cut, False
                    fault, conn.cuts[d] = conn.cuts[d], None
                if cut or fault is not None:
                    b.sendall(data[:len(data) // 2])
                    self._kill(conn, rst=True)
                    if fault is not None:
                        fault._one_done(partial=len(data) > 1)
                    return
                self._throttle(conn, d, len(data))
                b.sendall(data)
                with self._lock:
                    if d == UP:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    due = bool(self._triggers)
                if due:
                    self._fire_due()
        except OSError:
            pass
        finally:
            if conn.dead[d] and not conn.closed.is_set():
                self._park(conn, a)  # swallow everything, even the FIN, until a's peer is gone
            elif not conn.closed.is_set():
                with contextlib.suppress(OSError):
                    b.shutdown(socket.SHUT_WR)  # pass the FIN on
            with self._lock:
                conn.done[d] = True
                finished = all(conn.done)
            if finished or conn.closed.is_set():
                self._kill(conn, rst=False)

    def _hold(self, conn: _Conn, d: int) -> bool:
        """Wait out stalls; False if the connection closed or went dark meanwhile."""
        while True:
            if conn.closed.is_set() or self._stop.is_set() or conn.dead[d]:
                return False
            until = max(conn.stalled_until, self._stall_until[d])
            left = until - time.monotonic()
            if left <= 0:
                return True
            conn.closed.wait(min(0.05, left))

    def _throttle(self, conn: _Conn, d: int, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            rate, until = self._rate[d], self._rate_until[d]
            if now >= until or rate <= 0:
                return
            self._link_free[d] = max(now, self._link_free[d]) + n / rate
            wait = min(self._link_free[d], until) - now
        conn.closed.wait(wait)

    def _park(self, conn: _Conn, a: socket.socket) -> None:
        """A dead direction: read nothing more (the sender's buffers fill, as on a real dead
        path) until `a`'s peer hangs up or the proxy closes; then the sockets may go."""
        try:
            p = select.poll()
            p.register(a.fileno(), select.POLLRDHUP)
        except (OSError, ValueError):
            return
        while not conn.closed.is_set() and not self._stop.is_set():
            try:
                events = p.poll(200)
            except OSError:
                return
            if any(ev & _POLL_GONE for _, ev in events):
                return

    def _fin(self, conn: _Conn, direction: str) -> None:
        if direction == "both":
            self._kill(conn, rst=False)
            return
        # a half-close toward one side; the peers' reaction closes the rest through the pumps
        conn.fin = True
        s = conn.server if direction == "up" else conn.client
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        # the pump of that direction finds its next send refused (EPIPE) and ends

    def _cut_overdue(self, fault: Fault) -> None:
        """A reset whose direction carried nothing within CUT_WAIT: reset now, uncut."""
        with self._lock:
            armed = [c for c in self._conns if fault in c.cuts]
        for c in armed:
            with c.lock:
                if fault not in c.cuts:
                    continue
                c.cuts = [None if x is fault else x for x in c.cuts]
            self._kill(c, rst=True)
            fault._one_done(partial=False)
        fault._heal()  # whatever could be cut has been (or closed by itself meanwhile)

    def _kill(self, conn: _Conn, rst: bool) -> None:
        first = not conn.closed.is_set()
        conn.closed.set()
        for s in (conn.client, conn.server):
            # shutdown wakes the pump threads blocked in recv(): a socket is only really
            # closed (FIN, or RST with linger 0) once no thread is inside a call on it
            with contextlib.suppress(OSError):
                if rst:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RD)
                else:
                    s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
        if first:
            with conn.lock:
                cuts, conn.cuts = conn.cuts, [None, None]
            for f in {id(f): f for f in cuts if f is not None}.values():
                f._one_done(partial=False)  # closed by something else before the cut

    def _chaos(self) -> None:
        while not self._stop.wait(self.rng.uniform(0.5, 1.5) * self.interval):
            if not self.chaos:
                continue
            with self._lock:
                live = [c for c in self._conns if not c.closed.is_set()]
            if not live:
                continue
            conn = self.rng.choice(live)
            kind = self.rng.choice(self.kinds)
            self.faults[kind] += 1
            if kind == "drop":
                self._kill(conn, rst=False)
            elif kind == "reset":
                self._kill(conn, rst=True)
            elif kind == "cut":
                with conn.lock:
                    conn.cut = True
            elif kind == "stall":
                conn.stalled_until = time.monotonic() + self.rng.uniform(0.3, 2.0)
