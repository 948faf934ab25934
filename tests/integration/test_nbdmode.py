"""nbd mode end to end: real NBD clients write through the source's export, real
source and receiver processes replicate every write, in order.

Peers: qemu-io and qemu-img (qemu-utils), nbdinfo and nbdcopy (libnbd-bin).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    CdpEnv,
    Daemons,
    assert_replica_equal,
    file_hash,
    run_cdp,
    scaled,
    wait_converged,
    wait_for,
)

from cdp.replica.store import Replica

BS = 64 * 1024
MiB = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")


def qemu_io(url: str, *commands: str, timeout: float = 120) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run([*args, url], capture_output=True, text=True, timeout=scaled(timeout))
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r.stdout


def start_nbd(cdp_env, daemons: Daemons, size: int, *, fill: bytes | None = None,
              volume_extra: str = "", inprocess: bool = False, **kw) -> tuple[CdpEnv, str]:
    env = cdp_env(mode="nbd", volume_extra=volume_extra, **kw)
    img = env.source.images["vol1"]
    with open(img, "wb") as fh:
        if fill is not None:
            fh.write(fill)
        fh.truncate(size)
    daemons.receiver(env, inprocess=inprocess)
    daemons.source(env, inprocess=inprocess)
    url = env.source.nbd_urls["vol1"]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    wait_port(port)
    return env, url


def wait_port(port: int) -> None:
    import socket

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False

    wait_for(up, scaled(20), what=f"the NBD export on port {port}")


def converge(env: CdpEnv, daemons: Daemons) -> dict:
    since = time.time()
    v = wait_converged(env, "vol1", since, timeout=scaled(60))
    assert_replica_equal(env, "vol1")
    return v


def test_qemu_io_writes_of_every_kind_replicate(cdp_env, daemons) -> None:
    env, url = start_nbd(cdp_env, daemons, 32 * MiB, inprocess=True)
    qemu_io(url, "write -P 0x11 0 1M", "write -P 0x22 3M 4k", "write -f -P 0x33 5M 64k",
            "write -z 0 256k", "discard 3M 64k", "write -P 0x44 31M 1M", "flush")
    qemu_io(url, "read -P 0x00 0 256k", "read -P 0x11 256k 768k", "read -P 0x33 5M 64k",
            "read -P 0x44 31M 1M")
    v = converge(env, daemons)
    assert v["mode"] == "nbd" and v["nbd"]["mode"] == "capture"
    table = run_cdp("status", "-c", env.source.toml)
    assert table.returncode == 0 and "capture" in table.stdout, table.stdout + table.stderr
    # unaligned writes across block boundaries, without a flush: cut at epoch_interval
    qemu_io(url, "write -P 0x55 65000 70000", "write -P 0x66 33554000 400")
    converge(env, daemons)


def test_qemu_img_convert_onto_the_export_and_libnbd_reads_it_back(cdp_env, daemons,
                                                                  tmp_path: Path) -> None:
    size = 24 * MiB
    env, url = start_nbd(cdp_env, daemons, size, inprocess=True)
    rng = random.Random(7)
    src = tmp_path / "guest.raw"
    with open(src, "wb") as fh:
        fh.truncate(size)
        for _ in range(40):
            fh.seek(rng.randrange(size // BS) * BS)
            fh.write(rng.randbytes(BS) if rng.random() < 0.5 else b"text-like " * 6553)
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), url],
                   check=True, timeout=scaled(120))
    assert file_hash(env.source.images["vol1"]) == file_hash(src)
    converge(env, daemons)
    if shutil.which("nbdinfo") is None or shutil.which("nbdcopy") is None:
        pytest.skip("libnbd-bin (nbdinfo, nbdcopy) not installed")
    info = json.loads(subprocess.run(["nbdinfo", "--json", url], capture_output=True, text=True,
                                     check=True, timeout=scaled(60)).stdout)
    assert info["exports"][0]["export-size"] == size
    back = tmp_path / "back.raw"
    subprocess.run(["nbdcopy", url, str(back)], check=True, timeout=scaled(120))
    assert file_hash(back) == file_hash(src)


# -- write-order fidelity --------------------------------------------------------

SLOTS = 48
GENERATIONS = 40


def _slot_offsets(rng: random.Random, size: int) -> list[int]:
    """4 KiB slots scattered over the volume, several in one 64 KiB block."""
    cells = rng.sample(range(size // 4096), SLOTS)
    return cells and [c * 4096 for c in cells]


def _order_log(offsets: list[int]) -> list[str]:
    """Record i goes to slot i % SLOTS with generation i // SLOTS + 1: a strict write order."""
    cmds = []
    for i in range(SLOTS * GENERATIONS):
        gen = i // SLOTS + 1
        cmds.append(f"write -P {gen} {offsets[i % SLOTS]} 4k")
        if i % 3 == 2:
            cmds.append("flush")
        if i % 6 == 5:
            cmds.append("sleep 4")  # milliseconds: long enough a run to kill the receiver often
    return cmds


def _prefix_of_log(image: Path, offsets: list[int]) -> int:
    """How many records the image holds, asserting that they are exactly the first ones."""
    gens = []
    with open(image, "rb") as fh:
        for off in offsets:
            fh.seek(off)
            cell = fh.read(4096)
            assert cell == bytes([cell[0]]) * 4096, f"slot at {off} holds a torn record"
            gens.append(cell[0])
    n = sum(gens)  # every record raises one slot's generation by one
    expected = [(n - j + SLOTS - 1) // SLOTS if n > j else 0 for j in range(SLOTS)]
    assert gens == expected, f"not a prefix of the write log: {n} records, slots {gens}"
    return n


@pytest.mark.slow
def test_every_applied_epoch_is_a_prefix_of_the_write_order(cdp_env, daemons) -> None:
    """Writes in a strict order; the receiver is killed at random moments; each time
    the recovered replica holds the first n records and nothing else."""
    size = 16 * MiB
    rng = random.Random(11)
    offsets = _slot_offsets(rng, size)
    env, url = start_nbd(cdp_env, daemons, size, volume_extra='epoch_interval = "50ms"')
    rx = daemons.all[0]
    converge(env, daemons)
    args = ["qemu-io", "-f", "raw"]
    for c in _order_log(offsets):
        args += ["-c", c]
    writer = subprocess.Popen([*args, url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = []
    try:
        while writer.poll() is None and len(seen) < 6:
            time.sleep(rng.uniform(0.3, 0.9))
            rx.kill()
            Replica.open(env.data_dir, "vol1").close()  # recover the WAL as a restart would
            seen.append(_prefix_of_log(env.replica_image("vol1"), offsets))
            rx.start()
    finally:
        _, err = writer.communicate(timeout=scaled(300))
    assert writer.returncode == 0, err
    assert seen, "the writer finished before the receiver could be killed once"
    converge(env, daemons)
    assert _prefix_of_log(env.replica_image("vol1"), offsets) == SLOTS * GENERATIONS
    assert seen == sorted(seen)  # acknowledged epochs are never lost


# -- crashes and catching up --------------------------------------------------------


def _random_image(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.slow
def test_source_killed_mid_burst_resends_only_dirty_blocks(cdp_env, daemons, fault_proxy) -> None:
    size = 96 * MiB
    from helpers import free_port

    port = free_port()
    proxy = fault_proxy(port)
    env, url = start_nbd(cdp_env, daemons, size, fill=_random_image(size, 3), port=port,
                         receiver_addr=f"127.0.0.1:{proxy.port}")
    src = daemons.all[1]
    converge(env, daemons)
    rng = random.Random(5)
    args = ["qemu-io", "-f", "raw"]
    for _ in range(400):
        args += ["-c", f"write -P {rng.randrange(1, 255)} {rng.randrange(size // BS) * BS} 64k"]
    writer = subprocess.Popen([*args, url],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.2, 0.5))
    src.kill()  # mid burst: the client loses its disk, like a VM whose host process died
    writer.wait(scaled(60))
    before = proxy.up
    src.start()
    converge(env, daemons)
    resent = proxy.up - before
    assert resent < size // 10, f"{resent} bytes crossed the wire to catch up a {size}-byte volume"
    st = env.source.volume_status("vol1")
    assert st is not None and st["nbd"]["resyncs"] >= 1


@pytest.mark.slow
def test_pull_ahead_when_the_link_is_slow(cdp_env, daemons, tmp_path: Path) -> None:
    size = 48 * MiB
    # 24 MiB of random data (it neither compresses nor dedups, so the link, not the CPU, sets
    # the pace) written against a 2 MiB/s link and 5 MiB of capture room: the journal must
    # fill unless the writer took over 9 s. A sparse image: the seed is zero runs, at once.
    env, url = start_nbd(cdp_env, daemons, size,
                         volume_extra='capture_memory = "1MiB"\ncapture_disk = "4MiB"\n'
                                      'rate_limit = "2MiB/s"')
    converge(env, daemons)

    def nbd() -> dict:
        return (env.source.volume_status("vol1") or {}).get("nbd", {})

    # the seed was a resync: until the journal is back in capture mode, writes are only tracked
    # (nothing to capture, so nothing to fall back from) -- under load that can take a while
    wait_for(lambda: nbd().get("mode") == "capture", scaled(30), what="the journal to capture again")
    rng = random.Random(9)
    cmds = []
    for i in range(24):
        src = tmp_path / f"random{i}"
        src.write_bytes(rng.randbytes(MiB))
        cmds.append(f"write -s {src} {rng.randrange(size // MiB) * MiB} 1M")
        cmds.append("flush")
    qemu_io(url, *cmds)  # never waits for the 2 MiB/s link: captured, spilled, then only tracked

    wait_for(lambda: nbd().get("fallbacks", 0) >= 1, scaled(30),
             what="the journal to fall back to dirty tracking")
    assert nbd()["spills"] >= 1  # the local log took some before it was full
    converge(env, daemons)
    assert env.source.volume_status("vol1")["nbd"]["mode"] == "capture"


def test_an_idle_volume_is_reported_current_as_time_goes_on(cdp_env, daemons) -> None:
    """With no writes, the source keeps telling the receiver (and its status) that the replica
    is current as of now, every couple of seconds: the RPO of an idle disk does not grow."""
    env, url = start_nbd(cdp_env, daemons, 8 * MiB, fill=_random_image(8 * MiB, 8), inprocess=True)
    qemu_io(url, "write -P 0x42 0 1M", "flush")
    converge(env, daemons)
    t = time.time()

    def status() -> dict:
        return env.source.volume_status("vol1") or {}

    wait_for(lambda: status().get("current_as_of", 0) > t + 1, scaled(20),
             what="an idle nbd volume to be reported current again")
    assert status()["phase"] == "idle" and not status().get("pending_epochs")


def test_a_clean_restart_sends_nothing_again(cdp_env, daemons) -> None:
    size = 32 * MiB
    env, url = start_nbd(cdp_env, daemons, size, fill=_random_image(size, 6), inprocess=True)
    src = daemons.all[1]
    qemu_io(url, "write -P 0x77 1M 2M", "flush")
    converge(env, daemons)
    logical = env.counters("vol1")["logical"]
    src.stop()
    src.start()
    converge(env, daemons)
    assert env.counters("vol1")["logical"] == logical  # the dirty map was clean


def test_the_export_can_require_tls(cdp_env, daemons, tmp_path: Path) -> None:
    from test_nbd_tls import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = (f'[volume.nbd_tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\n'
           f'client_ca = "{pki.ca}"\n')
    env, url = start_nbd(cdp_env, daemons, 8 * MiB, volume_extra=tls, inprocess=True)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    plain = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 4k", url], capture_output=True,
                           text=True, timeout=scaled(60))
    assert plain.returncode != 0  # no TLS, no disk
    opts = (f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export=vol1,"
            "file.tls-creds=tls0")
    r = subprocess.run(["qemu-io", "--object",
                        f"tls-creds-x509,id=tls0,dir={pki.client_dir},endpoint=client",
                        "-c", "write -P 0x5c 64k 1M", "-c", "flush", "--image-opts", opts],
                       capture_output=True, text=True, timeout=scaled(60))
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    converge(env, daemons)


def test_bad_clients_leave_the_image_sound_and_replication_going(cdp_env, daemons) -> None:
    import socket
    import struct

    from cdp.benchmark.nbdclient import NbdClient, NbdClientError

    size = 8 * MiB
    env, url = start_nbd(cdp_env, daemons, size, inprocess=True)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    qemu_io(url, "write -P 0x21 0 1M", "flush")
    # a write whose payload never fully arrives: the client vanishes mid-request
    c = NbdClient(("127.0.0.1", port), "vol1")
    c.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 2 * MiB, 65536) + b"\xee" * 1000)
    c.sock.close()
    # a write past the end is refused with an error reply, and the connection goes on
    c = NbdClient(("127.0.0.1", port), "vol1")
    with pytest.raises(NbdClientError):
        c.write(size - 4096, b"x" * 8192)
        c.flush()
    c.sock.close()
    # an unknown export and garbage instead of a handshake
    with pytest.raises(NbdClientError):
        NbdClient(("127.0.0.1", port), "no-such-volume")
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
    s.close()
    qemu_io(url, "read -P 0x21 0 1M", "read -P 0 2M 64k")  # nothing of the broken write landed
    qemu_io(url, "write -P 0x22 4M 64k", "flush")
    converge(env, daemons)
