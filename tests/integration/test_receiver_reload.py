"""SIGHUP reloads a running receiver (issue 15: it used to kill it, exit 129, no log line).

One real receiver process, two real sources. A reload rotates one client's token (its
connection ends; the other client's never does and keeps replicating), takes a volume away
from the other client (its writes stop cleanly), shrinks retention (pruned at once), adds an
archive (the scheduler runs it) and moves the metrics endpoint. A broken config changes
nothing and says why. The receiver is the same process from start to end.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
import urllib.request

from helpers import (
    MiB,
    assert_replica_equal,
    free_port,
    make_image,
    read_json,
    run_cdp,
    wait_converged,
    wait_for,
    write_random_blocks,
)

from cdp.replica.points import list_points

SIZE = 2 * MiB
BLOCKS = SIZE // (64 * 1024)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def test_sighup_reloads_the_receiver(cdp_env, daemons):
    m1, m2 = free_port(), free_port()
    env = cdp_env({"host1": ["vol1"], "host2": ["vol2", "vol3"]},
                  receiver_extra=f'metrics_listen = "127.0.0.1:{m1}"')
    rng = random.Random(15)
    images = {v: env.sources[c].images[v] for c, vs in (("host1", ["vol1"]),
                                                        ("host2", ["vol2", "vol3"])) for v in vs}
    for img in images.values():
        make_image(img, SIZE, rng, zero=0.0)
    rx = daemons.receiver(env)
    src1 = daemons.source(env, "host1")
    src2 = daemons.source(env, "host2")
    for rounds in range(3):  # a few epochs each: recovery points to prune later
        t = time.time()
        if rounds:
            for img in images.values():
                write_random_blocks(img, rng.sample(range(BLOCKS), 3), rng)
        for c, vs in (("host1", ["vol1"]), ("host2", ["vol2", "vol3"])):
            for v in vs:
                wait_converged(env, v, t, src1 if c == "host1" else src2, rx, client=c)
    assert len(list_points(env.replica_dir("vol1"))) >= 3
    vol3_epoch = env.replica_state("vol3")["epoch"]

    # the next config: host1's token rotated, vol3 taken from host2, a small journal, an
    # archive, metrics elsewhere (the token file is shared with source-host1.toml, as
    # after `scp`: the source picks it up at its own SIGHUP)
    repo = env.root / "archive"
    good = (env.receiver_toml.read_text()
            .replace(f"127.0.0.1:{m1}", f"127.0.0.1:{m2}")
            .replace('volumes = ["vol2", "vol3"]', 'volumes = ["vol2"]')
            .replace("[receiver]", '[receiver]\nkeep_points_size = "1KiB"')
            + f'\n[[archive]]\nname = "offsite"\nrepository = "{repo}"\nencrypt = false\n'
              'schedule = "every 1h"\n')
    env.receiver_toml.write_text(good)
    r = run_cdp("archive", "init", "-c", env.receiver_toml)
    assert r.returncode == 0, r.stderr
    fd = os.open(env.tokens["host1"], os.O_WRONLY | os.O_TRUNC)
    os.write(fd, os.urandom(32).hex().encode() + b"\n")
    os.close(fd)
    os.kill(rx.pid, signal.SIGHUP)

    wait_for(lambda: "closing the connection of client=host1" in rx.log_text(), 20,
             what=lambda: f"host1 to be disconnected\n{rx.tail()}")
    log = rx.log_text()
    assert "reloading" in log and "(SIGHUP)" in log
    assert ("config reload: client host1: the token changed: its connections are closed" in log)
    assert "config reload: client host2: volumes vol2, vol3 -> vol2 (its writes to vol3 stop now)" \
        in log
    assert "config reload: receiver.keep_points_size: 10.0 GiB -> 1.0 KiB" in log
    assert f"config reload: receiver.metrics_listen: 127.0.0.1:{m1} -> 127.0.0.1:{m2}" in log
    assert "needs a restart" not in log
    # retention: pruned by the reload itself (host1 sends nothing more until it reloads)
    wait_for(lambda: len(list_points(env.replica_dir("vol1"))) == 1, 10,
             what="vol1's old points to be pruned")
    # vol3 stopped cleanly for host2: told why, and it does not move any more
    wait_for(lambda: "volume=vol3 stopped by the receiver" in src2.log_text(), 20,
             what=lambda: f"host2 to be told about vol3\n{src2.tail()}")
    assert "may no longer write volume 'vol3'" in src2.log_text()
    # host1's old token no longer works; host2 goes on replicating on its first connection
    wait_for(lambda: "receiver refused us" in src1.log_text(), 20,
             what=lambda: f"host1's old token to be refused\n{src1.tail()}")
    t = time.time()
    write_random_blocks(images["vol2"], rng.sample(range(BLOCKS), 4), rng)
    write_random_blocks(images["vol3"], rng.sample(range(BLOCKS), 4), rng)
    wait_converged(env, "vol2", t, src2, rx, client="host2")
    assert_replica_equal(env, "vol2", images["vol2"])
    assert env.replica_state("vol3")["epoch"] == vol3_epoch
    # the archive added by the reload ran from the receiver's scheduler
    state = wait_for(lambda: ((read_json(env.data_dir / ".archive-state.json") or {})
                              .get("archives", {}).get("offsite")), 60,
                     what=lambda: f"the archive to run\n{rx.tail()}")
    assert state["ok"], state
    # metrics moved
    wait_for(lambda: _listening(m2), 10, what="metrics on the new port")
    assert not _listening(m1)
    with urllib.request.urlopen(f"http://127.0.0.1:{m2}/metrics", timeout=10) as resp:
        assert b"cdp_receiver_epoch" in resp.read()

    # a broken config: nothing changes, the log says why
    env.receiver_toml.write_text(good.replace("[receiver]", "[receiver]\nmax_connections = 0"))
    os.kill(rx.pid, signal.SIGHUP)
    wait_for(lambda: "config reload failed" in rx.log_text(), 20, what="the reload error")
    log = rx.log_text()
    assert "still running with the previous config" in log
    assert "receiver.max_connections" in log and str(env.receiver_toml.resolve()) in log
    env.receiver_toml.write_text(good.replace("[receiver]", "[receiver\n"))  # not even TOML
    os.kill(rx.pid, signal.SIGHUP)
    wait_for(lambda: "not valid TOML" in rx.log_text(), 20, what="the second reload error")
    t = time.time()
    write_random_blocks(images["vol2"], rng.sample(range(BLOCKS), 4), rng)
    wait_converged(env, "vol2", t, src2, rx, client="host2")

    # the source takes its new token at its own SIGHUP and comes back
    env.receiver_toml.write_text(good)
    os.kill(src1.pid, signal.SIGHUP)
    wait_for(lambda: "source.token_file: the token changed" in src1.log_text(), 20,
             what="the source's reload")
    t = time.time()
    write_random_blocks(images["vol1"], rng.sample(range(BLOCKS), 4), rng)
    wait_converged(env, "vol1", t, src1, rx, client="host1")
    assert_replica_equal(env, "vol1", images["vol1"])

    log = rx.log_text()
    assert log.count("client authenticated client=host2") == 1  # never dropped
    assert rx.running and rx.starts == 1
    src1.stop()
    src2.stop()
    rx.stop()
