"""A fault-injecting TCP proxy for tests: 127.0.0.1:port -> 127.0.0.1:target.

While "chaos" is on, a seeded random schedule picks a live connection every
`interval` seconds (on average) and does one of:

- drop:  close both sides cleanly (FIN), as a restarted middlebox would;
- reset: close both sides with RST (SO_LINGER 0), nothing flushed;
- cut:   forward only the first half of the next chunk in one direction, then
         reset both sides: a frame cut in half on the wire;
- stall: forward nothing in either direction for 0.3-2 s (the kernel buffers
         fill, the senders block), then go on;
and every chunk is delayed by 0..`delay` seconds (latency, jitter).

`calm()` stops the faults (delays too) so a test can wait for convergence;
`faults` counts what was done, `connections` how many were accepted.
`blackhole()` makes every live connection silently stop forwarding in both directions,
without closing anything (a half-open link); new connections are forwarded as usual.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter

CHUNK = 16 * 1024  # small reads: a cut lands inside a frame, not between frames
KINDS = ("drop", "reset", "cut", "stall")


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.lock = threading.Lock()
        self.stalled_until = 0.0
        self.cut = False
        self.closed = False


class FaultProxy:
    def __init__(self, target_port: int, *, seed: int = 0, interval: float = 1.0,
                 delay: float = 0.01, kinds: tuple[str, ...] = KINDS) -> None:
        self.target = target_port
        self.rng = random.Random(seed)
        self.interval = interval
        self.delay = delay
        self.kinds = kinds
        self.chaos = False
        self.faults: Counter[str] = Counter()
        self.connections = 0
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        self._stop = threading.Event()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(16)
        self.port = self._srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="faultproxy-accept").start()
        threading.Thread(target=self._chaos, daemon=True, name="faultproxy-chaos").start()

    # -- control ---------------------------------------------------------------------

    def start_chaos(self) -> None:
        self.chaos = True

    def calm(self) -> None:
        """No more faults or delays; stalls in progress end now."""
        self.chaos = False
        with self._lock:
            for c in self._conns:
                c.stalled_until = 0.0
                c.cut = False

    def blackhole(self) -> int:
        """Stop forwarding on every live connection, both ways, for good, closing nothing: a
        NAT that forgot the connection, a peer gone without RST. Returns how many went dark."""
        with self._lock:
            live = [c for c in self._conns if not c.closed]
        for c in live:
            c.stalled_until = float("inf")
        self.faults["blackhole"] += len(live)
        return len(live)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._srv.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            self._kill(c, rst=False)

    # -- plumbing --------------------------------------------------------------------

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
            conn = _Conn(client, server)
            with self._lock:
                self._conns.append(conn)
                self.connections += 1
            threading.Thread(target=self._pump, args=(conn, client, server, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, server, client, False),
                             daemon=True).start()

    def _pump(self, conn: _Conn, a: socket.socket, b: socket.socket, up: bool) -> None:
        try:
            while not conn.closed:
                data = a.recv(CHUNK)
                if not data:
                    break
                while time.monotonic() < conn.stalled_until and not conn.closed:
                    time.sleep(0.02)
                if self.chaos and self.delay:
                    time.sleep(self.rng.uniform(0, self.delay))
                with conn.lock:
                    cut = conn.cut
                    conn.cut = False
                if cut and len(data) > 1:
                    b.sendall(data[:len(data) // 2])
                    self._kill(conn, rst=True)
                    return
                b.sendall(data)
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)
            if conn.closed:
                self._kill(conn, rst=False)

    def _kill(self, conn: _Conn, rst: bool) -> None:
        conn.closed = True
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

    def _chaos(self) -> None:
        while not self._stop.wait(self.rng.uniform(0.5, 1.5) * self.interval):
            if not self.chaos:
                continue
            with self._lock:
                live = [c for c in self._conns if not c.closed]
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
