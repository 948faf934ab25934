"""Session takeover: a client's new connection supersedes its old one at once.

The receiver runs in-process on 127.0.0.1; the "sources" are raw protocol sessions over real
sockets, so a test can leave a connection silently hanging (a dead link the receiver has not
noticed) and open a second one beside it. The new connection must get the volume at once (no
`busy`), and be told the epoch the replica truly holds: the old connection's sealed epochs
applied first, its unsealed epoch discarded. A different client still gets `busy`. After every
step the replica's image and hash map agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import CdpEnv, read_json

from cdp.blocks import Geometry, pack_u64
from cdp.codec import HASH_LEN, block_hash, compress, zero_hash
from cdp.config import load_receiver
from cdp.receiver.daemon import Receiver
from cdp.replica import EpochWriter
from cdp.wire.messages import (
    Ack,
    Begin,
    Challenge,
    Commit,
    Data,
    Error,
    Message,
    Open,
    Opened,
    Ping,
    Pong,
    Ref,
    Welcome,
)
from cdp.wire.source_session import SourceSession
from cdp.wire.transport import Link

VOL = "vol1"
BS = 4096
GEO = Geometry(512 * BS, BS)
TIMEOUT = 20.0


class Client:
    """One raw connection of a source, driven step by step."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.inbox: list[Message] = []

    @classmethod
    async def connect(cls, port: int, name: str, token: bytes) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = SourceSession(name, token)
        link = Link(session, reader, writer)
        session.start()
        await link.flush()
        for want in (Challenge, Welcome):
            msg = (await link.receive(TIMEOUT))[0]
            assert isinstance(msg, want), msg
            if want is Challenge:
                session.auth()
                await link.flush()
        return cls(link)

    async def next(self) -> Message:
        while not self.inbox:
            self.inbox.extend(await self.link.receive(TIMEOUT))
        return self.inbox.pop(0)

    async def open(self) -> Message:
        await self.link.send(Open(VOL, GEO.size, GEO.block_size))
        return await self.next()

    async def epoch(self, epoch: int, blocks: dict[int, bytes], commit: bool = True) -> None:
        await self.link.send(Begin(VOL, epoch, float(epoch)))
        idx = sorted(blocks)
        data = b"".join(blocks[i] for i in idx)
        await self.link.send(Data(VOL, epoch, pack_u64(idx), b"".join(block_hash(blocks[i]) for i in idx),
                                  len(data), compress(data)))
        if commit:
            await self.link.send(Commit(VOL, epoch, len(idx)))


def agree(data_dir: Path) -> None:
    """The replica's image and hash map agree block by block (cdp verify --replica)."""
    image = (data_dir / VOL / "image").read_bytes()
    hashes = (data_dir / VOL / "hashes").read_bytes()
    bad = []
    for i in range(GEO.blocks):
        want = hashes[i * HASH_LEN:(i + 1) * HASH_LEN]
        if want == bytes(HASH_LEN):
            want = zero_hash(BS)
        if block_hash(image[i * BS:(i + 1) * BS]) != want:
            bad.append(i)
    assert not bad, f"image and hash map disagree at blocks {bad[:10]}"


def state_epoch(data_dir: Path) -> int:
    st = read_json(data_dir / VOL / "state.json")
    assert st is not None
    return int(st["epoch"])


def run_with_receiver(env: CdpEnv, body: Callable[[Receiver, int], Awaitable[None]]) -> None:
    async def main() -> None:
        rx = Receiver(load_receiver(env.receiver_toml))
        ready = asyncio.Event()
        task = asyncio.create_task(rx.run(ready))
        async with asyncio.timeout(TIMEOUT):
            await ready.wait()
        try:
            async with asyncio.timeout(120):
                await body(rx, rx.port)
        finally:
            rx.stop()
            async with asyncio.timeout(60):
                await task

    asyncio.run(main())


def blocks(rng: random.Random, n: int, start: int = 0) -> dict[int, bytes]:
    return {start + k: rng.randbytes(BS) for k in range(n)}


def test_reconnect_supersedes_a_silent_old_connection(cdp_env: Callable[..., CdpEnv],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The old connection sealed epoch 1 and had epoch 2 half received when its link went
    silent. The new connection is answered at once with epoch 1 (sealed: applied; 2: gone),
    and its own epoch 2 lands; the old connection is closed."""
    env = cdp_env()
    token = env.token("host1")
    rng = random.Random(1)

    async def body(rx: Receiver, port: int) -> None:
        old = await Client.connect(port, "host1", token)
        assert isinstance(await old.open(), Opened)
        await old.epoch(1, blocks(rng, 256))
        await old.epoch(2, blocks(rng, 64, 100), commit=False)  # never committed
        await asyncio.sleep(0.2)
        # the old link is now silent (it neither reads nor writes); the client reconnects
        new = await Client.connect(port, "host1", token)
        opened = await new.open()
        assert isinstance(opened, Opened), opened
        assert opened.epoch == 1 == state_epoch(env.data_dir)
        agree(env.data_dir)
        # the old connection was told why and closed
        got: list[Message] = []
        with contextlib.suppress(Exception):
            while True:
                got.extend(await old.link.receive(5))
        assert any(isinstance(m, Error) and m.code == "superseded" for m in got), got
        two = blocks(rng, 32, 300)
        await new.epoch(2, two)
        ack = await new.next()
        assert isinstance(ack, Ack) and ack.epoch == 2
        agree(env.data_dir)
        image = (env.data_dir / VOL / "image").read_bytes()
        assert all(image[i * BS:(i + 1) * BS] == b for i, b in two.items())
        await new.link.close()
        await old.link.close()

    caplog.set_level("WARNING", logger="cdp.receiver")
    run_with_receiver(env, body)
    assert "session takeover client=host1 volume=vol1" in caplog.text


def test_takeover_right_after_commit_gives_the_true_epoch(cdp_env: Callable[..., CdpEnv]) -> None:
    """Reconnects racing the old connection's last Commit, many times over: whatever the
    timing, Opened names the epoch the replica holds, nothing of the old connection lands
    after it, and image and hash map agree."""
    env = cdp_env()
    token = env.token("host1")
    rng = random.Random(2)

    async def body(rx: Receiver, port: int) -> None:
        conn = await Client.connect(port, "host1", token)
        opened = await conn.open()
        assert isinstance(opened, Opened)
        epoch = opened.epoch
        for round_ in range(12):
            await conn.epoch(epoch + 1, blocks(rng, rng.randrange(1, 512)))
            if round_ % 3:
                await asyncio.sleep(rng.random() * 0.02)
            new = await Client.connect(port, "host1", token)
            opened = await new.open()
            assert isinstance(opened, Opened), opened
            assert opened.epoch in (epoch, epoch + 1)
            assert opened.epoch == state_epoch(env.data_dir)
            agree(env.data_dir)
            await asyncio.sleep(0.05)
            assert state_epoch(env.data_dir) == opened.epoch  # nothing late from the old one
            with contextlib.suppress(Exception):
                await conn.link.close()
            conn, epoch = new, opened.epoch
        await conn.link.close()

    run_with_receiver(env, body)


def test_another_client_still_gets_busy(cdp_env: Callable[..., CdpEnv]) -> None:
    env = cdp_env({"host1": [VOL], "host2": [VOL]})

    async def body(rx: Receiver, port: int) -> None:
        one = await Client.connect(port, "host1", env.token("host1"))
        assert isinstance(await one.open(), Opened)
        two = await Client.connect(port, "host2", env.token("host2"))
        refused = await two.open()
        assert isinstance(refused, Error) and refused.code == "busy", refused
        assert "another client (host1)" in refused.message
        await one.epoch(1, blocks(random.Random(3), 8))  # the holder goes on undisturbed
        ack: Any = await one.next()
        assert isinstance(ack, Ack) and ack.epoch == 1
        await one.link.close()
        await two.link.close()

    run_with_receiver(env, body)


def test_pings_are_answered_while_an_earlier_epoch_applies(cdp_env: Callable[..., CdpEnv],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow disk at the DR site must not look like a dead link: while epoch 1 is applying
    (held here), references in epoch 2 to content already in the image are resolved and a Ping
    is answered at once; the source's dead_after never runs out on a busy receiver."""
    env = cdp_env()
    gate = threading.Event()
    real_apply = EpochWriter.apply

    def slow_apply(self: EpochWriter) -> Any:
        if self.epoch == 2:
            assert gate.wait(60), "the test never released the apply"
        return real_apply(self)

    monkeypatch.setattr(EpochWriter, "apply", slow_apply)
    rng = random.Random(4)

    async def body(rx: Receiver, port: int) -> None:
        c = await Client.connect(port, "host1", env.token("host1"))
        assert isinstance(await c.open(), Opened)
        first = blocks(rng, 16)
        await c.epoch(1, first)
        assert isinstance(await c.next(), Ack)
        await c.epoch(2, blocks(rng, 64, 100))  # its apply is held
        await c.link.send(Begin(VOL, 3, 3.0))
        idx = [200, 201]
        await c.link.send(Ref(VOL, 3, VOL, pack_u64(idx),
                              block_hash(first[0]) + block_hash(first[1]), pack_u64([0, 1])))
        await c.link.send(Ping(7))
        pong = await c.next()
        assert isinstance(pong, Pong) and pong.nonce == 7, pong
        assert state_epoch(env.data_dir) == 1  # epoch 2 is still applying
        await c.link.send(Commit(VOL, 3, len(idx)))
        gate.set()
        acks = [await c.next(), await c.next()]
        assert [type(m) for m in acks] == [Ack, Ack] and [m.epoch for m in acks] == [2, 3], acks
        agree(env.data_dir)
        image = (env.data_dir / VOL / "image").read_bytes()
        assert image[200 * BS:201 * BS] == first[0] and image[201 * BS:202 * BS] == first[1]
        await c.link.close()

    try:
        run_with_receiver(env, body)
    finally:
        gate.set()
