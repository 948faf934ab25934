"""`cdp pause|resume|resync` on the source's control channel, with real source and receiver
processes: a paused volume ships nothing (and stays paused across a SIGKILL), its changes are
not forgotten on resume; a resync repairs a replica block that went bad behind cdp's back."""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest
from helpers import (
    MiB,
    assert_replica_equal,
    free_port,
    make_image,
    run_cdp,
    scaled,
    wait_converged,
    wait_for,
    write_random_blocks,
)
from test_metrics import scrape, val, wait_metrics_port
from test_nbdmode import qemu_io, start_nbd, wait_port

VOL = "vol1"


def cdp_ok(*args: object) -> dict:
    r = run_cdp(*map(str, args), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def applied(env) -> int:
    return env.replica_state(VOL)["epoch"]


def phase_is(env, phase: str) -> dict:
    return wait_for(lambda: (v := env.source.volume_status(VOL)) and v["phase"] == phase and v,
                    30, what=lambda: f"phase {phase}; source says {env.source.volume_status(VOL)}")


def nothing_shipped(env, epoch: int, seconds: float = 3.0) -> None:
    """For a while (several scan intervals), the replica's applied epoch stays at `epoch`."""
    end = time.monotonic() + scaled(seconds)
    while time.monotonic() < end:
        assert applied(env) == epoch, "a paused volume shipped an epoch"
        v = env.source.volume_status(VOL)
        assert v is not None and v["paused"], v
        time.sleep(0.1)


def corrupt_replica_block(env, rx, block: int) -> None:
    """Behind cdp's back (receiver stopped): one block of the replica image goes bad; the
    receiver's own hash map still says what it should hold."""
    bs = env.replica_state(VOL)["block_size"]  # nbd volumes default to smaller blocks
    rx.stop()
    with open(env.replica_image(VOL), "r+b") as fh:
        fh.seek(block * bs)
        fh.write(random.Random(block).randbytes(bs))
    rx.start()


def test_pause_holds_across_a_kill_and_resume_ships_everything(cdp_env, daemons) -> None:
    port = free_port()
    env = cdp_env(scan_interval="0.3s", source_extra=f'metrics_listen = "127.0.0.1:{port}"')
    image = env.source.images[VOL]
    rng = random.Random(15)
    make_image(image, 8 * MiB, rng)
    rx = daemons.receiver(env)
    src = daemons.source(env)
    wait_converged(env, VOL, time.time(), src, rx)

    out = cdp_ok("pause", "-c", env.source.toml, VOL)
    assert out["ok"] and out["volumes"][VOL]["changed"] is True
    since = out["volumes"][VOL]["paused_since"]
    v = phase_is(env, "paused")
    assert v["paused_since"] == since
    held_at, as_of = applied(env), v["current_as_of"]
    wait_metrics_port(port)
    assert val(scrape(port), "cdp_source_volume_paused", volume=VOL) == 1
    assert val(scrape(port), "cdp_source_volume_phase", volume=VOL, phase="paused") == 1

    write_random_blocks(image, range(10, 20), rng)
    written = time.time()
    nothing_shipped(env, held_at)
    v = env.source.volume_status(VOL)
    assert v["current_as_of"] == as_of < written  # the lag is honest: no claim to be current
    assert v["lag"] > time.time() - written
    table = run_cdp("status", "-c", env.source.toml)
    assert table.returncode == 0 and "paused since" in table.stdout, table.stdout + table.stderr
    again = cdp_ok("pause", "-c", env.source.toml, VOL)["volumes"][VOL]
    assert again["changed"] is False and again["paused_since"] == since

    # a crash does not undo the maintenance window
    src.kill()
    src.start()
    v = phase_is(env, "paused")
    assert v["paused_since"] == since
    write_random_blocks(image, range(60, 64), rng)
    nothing_shipped(env, held_at)

    resumed_at = time.time()
    out = cdp_ok("resume", "-c", env.source.toml, VOL)
    assert out["volumes"][VOL]["changed"] is True and out["volumes"][VOL]["paused_since"] is None
    v = wait_converged(env, VOL, resumed_at, src, rx)
    assert not v["paused"] and applied(env) > held_at
    assert_replica_equal(env, VOL)
    wait_metrics_port(port)
    assert val(scrape(port), "cdp_source_volume_paused", volume=VOL) == 0
    assert not (env.source.state_dir / VOL / "paused.json").exists()
    src.stop()
    rx.stop()


def test_a_pause_stops_a_seed_midway_and_resume_sends_only_the_rest(cdp_env, daemons) -> None:
    env = cdp_env(scan_interval="0.3s", source_extra='read_limit = "4MiB/s"\n'
                  'max_epoch_bytes = "1MiB"')
    image = env.source.images[VOL]
    make_image(image, 32 * MiB, random.Random(3), zero=0.0, text=0.0)  # 512 distinct blocks
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_for(lambda: (v := env.source.volume_status(VOL)) and v["progress_done"] >= 4 * MiB
             and v["phase"] == "seeding", 30, what="the seed to get going")
    cdp_ok("pause", "-c", env.source.toml, VOL)
    v = phase_is(env, "paused")
    assert 0 < v["progress_done"] < v["progress_total"]  # stopped midway, what it found sent
    wait_for(lambda: env.replica_state(VOL) and not env.source.volume_status(VOL)["pending_epochs"],
             30, what="the epochs committed before the pause to be applied")
    held_at = applied(env)
    nothing_shipped(env, held_at)
    v = env.source.volume_status(VOL)
    assert not v["current_as_of"] and v["lag"] is None  # a partial seed is not a current replica

    resumed_at = time.time()
    cdp_ok("resume", "-c", env.source.toml, VOL)
    v = wait_converged(env, VOL, resumed_at, src, rx)
    assert v["stats"]["changed"] == 512  # each block sent once: the rest, not the whole again
    assert_replica_equal(env, VOL)
    src.stop()
    rx.stop()


def test_resync_repairs_a_replica_block_that_went_bad(cdp_env, daemons) -> None:
    env = cdp_env(scan_interval="0.3s")
    image = env.source.images[VOL]
    make_image(image, 8 * MiB, random.Random(7), zero=0.0)
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_converged(env, VOL, time.time(), src, rx)

    corrupt_replica_block(env, rx, 37)
    r = run_cdp("verify", "-c", env.source.toml, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)[0]["differing"] == [37], r.stdout + r.stderr
    # scans alone never notice: the source's map says the replica holds block 37
    before = applied(env)
    out = cdp_ok("resync", "-c", env.source.toml, VOL, "--wait", "--timeout", "60s")
    assert out["volumes"][VOL]["blocks"] == 1 and out["volumes"][VOL]["epoch"] > before
    assert_replica_equal(env, VOL)
    r = run_cdp("verify", "-c", env.source.toml)
    assert r.returncode == 0, r.stdout + r.stderr

    # queued without --wait; a replica that is fine: nothing to send
    out = cdp_ok("resync", "-c", env.source.toml, "--all")
    assert out["volumes"][VOL]["queued"] is True
    wait_for(lambda: src.log_text().count("resync done") >= 2, 30, what="the second resync")
    assert "resync done: 0 block(s)" in src.log_text()
    wait_for(lambda: env.source.volume_status(VOL)["resync"] == "", 10,
             what="status to say no resync is queued or running")
    src.stop()
    rx.stop()


def test_control_verbs_say_what_is_wrong(cdp_env, daemons) -> None:
    env = cdp_env()
    make_image(env.source.images[VOL], 1 * MiB, random.Random(1))
    for verb in ("pause", "resume", "resync"):
        r = run_cdp(verb, "-c", env.source.toml, "nope")
        assert r.returncode == 2 and "'nope'" in r.stderr and VOL in r.stderr, r.stderr
        r = run_cdp(verb, "-c", env.source.toml)
        assert r.returncode == 2 and "--all" in r.stderr, r.stderr
        r = run_cdp(verb, "-c", env.source.toml, VOL)
        assert r.returncode == 1 and "not running" in r.stdout, r.stdout + r.stderr
    r = run_cdp("pause", "-c", env.receiver_toml, VOL)
    assert r.returncode == 2 and "receiver config" in r.stderr, r.stderr

    # running, paused: a resync or a checkpoint would not reach the replica, so they say so
    rx = daemons.receiver(env, inprocess=True)
    src = daemons.source(env, inprocess=True)
    wait_converged(env, VOL, time.time(), src, rx)
    cdp_ok("pause", "-c", env.source.toml, "--all")
    r = run_cdp("resync", "-c", env.source.toml, VOL, "--wait")
    assert r.returncode == 1 and "resume" in r.stdout, r.stdout + r.stderr
    r = run_cdp("checkpoint", "-c", env.source.toml, VOL, "--label", "x", "--timeout", "20s")
    assert r.returncode == 1 and "paused" in r.stdout, r.stdout + r.stderr
    cdp_ok("resume", "-c", env.source.toml, "--all")
    src.stop()
    rx.stop()


needs_qemu = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")


@needs_qemu
def test_nbd_pause_keeps_the_guest_writing_and_resume_catches_up(cdp_env, daemons) -> None:
    env, url = start_nbd(cdp_env, daemons, 16 * MiB)
    src = next(d for d in daemons.all if d.verb == "source")
    qemu_io(url, "write -P 0x11 0 1M", "flush")
    wait_converged(env, VOL, time.time())
    cdp_ok("pause", "-c", env.source.toml, VOL)
    phase_is(env, "paused")
    held_at = applied(env)

    qemu_io(url, "write -P 0x22 2M 512k", "write -z 4M 64k", "flush")  # the guest goes on
    qemu_io(url, "read -P 0x22 2M 512k")
    nothing_shipped(env, held_at)
    assert env.source.volume_status(VOL)["nbd"]["mode"] == "tracking"  # dirty regions only

    src.kill()  # paused across a crash: the export serves again, still nothing shipped
    src.start()
    wait_port(int(url.rsplit(":", 1)[1].split("/")[0]))
    phase_is(env, "paused")
    qemu_io(url, "write -P 0x33 9M 64k", "flush")
    nothing_shipped(env, held_at)

    resumed_at = time.time()
    cdp_ok("resume", "-c", env.source.toml, VOL)
    wait_converged(env, VOL, resumed_at)
    assert applied(env) > held_at
    assert_replica_equal(env, VOL)


@needs_qemu
def test_nbd_resync_repairs_a_replica_block(cdp_env, daemons) -> None:
    env, url = start_nbd(cdp_env, daemons, 8 * MiB, inprocess=True)
    rx = next(d for d in daemons.all if d.verb == "receiver")
    qemu_io(url, "write -P 0x44 0 8M", "flush")
    wait_converged(env, VOL, time.time())
    corrupt_replica_block(env, rx, 5)
    out = cdp_ok("resync", "-c", env.source.toml, VOL, "--wait", "--timeout", "60s")
    assert out["volumes"][VOL]["blocks"] == 1
    assert_replica_equal(env, VOL)
