"""Status snapshots (cdp.status): the one builder, the JSON mapping, and the daemons' snapshot
methods over real replica files, without sockets or running daemons."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import cast

import pytest

from cdp.blocks import Geometry, pack_u64
from cdp.cli.status import receiver_volumes
from cdp.codec import block_hash, compress
from cdp.config import VolumeConfig, load_receiver
from cdp.receiver.connection import Connection
from cdp.receiver.daemon import Receiver
from cdp.receiver.live import VolumeLive
from cdp.receiver.sink import VolumeSink
from cdp.replica import Replica
from cdp.replica.points import list_points
from cdp.replica.writer import EpochWriter
from cdp.source.phase import Phase
from cdp.source.volume import VolumeState
from cdp.status import (
    LiveFacts,
    PointsFacts,
    ReplicaFacts,
    SourceStatus,
    SourceVolumeStatus,
    VolumeStatus,
    volume_status,
)

BS = 65536
GEO = Geometry(8 * BS, BS)
T0 = time.time() - 1000  # epoch e was captured at T0 + e

VOLUME_KEYS = {"volume", "epoch", "epoch_time", "applied_at", "size", "block_size", "counters",
               "current_as_of", "lag", "connected", "client", "error", "rate", "wire_rate",
               "points", "oldest_point_epoch", "oldest_point_time", "window", "journal_bytes",
               "promoted"}
SOURCE_VOLUME_KEYS = {"volume", "path", "phase", "acked_epoch", "pending_epochs", "replica_id",
                      "seeded", "progress_done", "progress_total", "current_as_of",
                      "confirmed_at", "lag", "last_ack", "rate", "error", "stats", "size",
                      "block_size", "rate_limit", "mode", "paused", "paused_since", "resync",
                      "resync_blocks"}
SOURCE_KEYS = {"source", "connected", "pid", "link_error", "link_error_since", "next_connect",
               "updated", "rate_limit", "read_limit", "window", "volumes", "filesets"}


def test_builder_takes_the_newer_of_replica_and_source_time() -> None:
    state = ReplicaFacts(epoch=7, epoch_time=900.0, applied_at=905.0, size=GEO.size,
                         block_size=BS, counters={"epochs": 7, "wire": 123})
    live = LiveFacts(client="host1", connected=True, current_as_of=950.0, rate=10.0,
                     wire_rate=4.0)
    v = volume_status("vol1", state, live, PointsFacts(3, 5, 800.0, 4096), promoted=False,
                      now=1000.0, pending_epochs=2, receiving=True)
    assert v.current_as_of == 950.0 and v.lag == 50.0  # the source said it is current
    assert v.window == 200.0 and v.oldest_point_epoch == 5 and v.points == 3
    assert (v.epoch, v.counters["wire"], v.client, v.connected) == (7, 123, "host1", True)
    # a source that said nothing newer: the replica's own epoch time counts
    older = volume_status("vol1", state, LiveFacts(current_as_of=10.0),
                          PointsFacts(1, 7, 900.0, 0), promoted=True, now=1000.0)
    assert older.current_as_of == 900.0 and older.lag == 100.0 and older.promoted
    assert not older.connected and older.window == 100.0


def test_builder_knows_no_lag_or_window_without_a_capture_time() -> None:
    v = volume_status("vol1", ReplicaFacts(), LiveFacts(), PointsFacts(1, 0, 0.0, 0),
                      promoted=False, now=1000.0)
    assert v.lag is None and v.window is None and v.oldest_point_time is None


def test_volume_json_keeps_its_keys_and_leaves_out_what_is_unknown() -> None:
    state = ReplicaFacts(3, 100.0, 101.0, GEO.size, BS, {"epochs": 3})
    offline = volume_status("v", state, LiveFacts(), PointsFacts(2, 2, 99.0, 10),
                            promoted=False, now=200.0)
    assert set(offline.to_dict()) == VOLUME_KEYS  # `cdp status --json` as before
    running = volume_status("v", state, LiveFacts(), PointsFacts(2, 2, 99.0, 10),
                            promoted=False, now=200.0, pending_epochs=0, receiving=False)
    d = running.to_dict()
    assert set(d) == VOLUME_KEYS | {"pending_epochs", "receiving"}  # the status page's
    assert d["pending_epochs"] == 0 and d["receiving"] is False  # known zero is not left out
    assert json.loads(json.dumps(d)) == d
    d["counters"]["epochs"] = 99  # a copy: the snapshot does not change under its reader
    assert running.counters["epochs"] == 3


def test_live_facts_from_a_stale_file_are_not_connected_or_moving() -> None:
    raw = {"client": "host1", "connected": True, "current_as_of": 5.0, "rate": 7.0,
           "wire_rate": 3.0, "error": "E: x", "updated": 1.0, "pid": 42}
    assert LiveFacts.from_dict(raw) == LiveFacts("host1", True, 5.0, 7.0, 3.0, "E: x")
    assert LiveFacts.from_dict(raw, fresh=False) == LiveFacts("host1", False, 5.0, 0.0, 0.0,
                                                              "E: x")
    assert set(LiveFacts().to_dict()) == set(raw) - {"updated", "pid"}  # the file's keys
    assert LiveFacts.from_dict({}) == LiveFacts()


def test_source_status_round_trips_through_json() -> None:
    nbd = {"mode": "capture", "backlog_bytes": 5, "listen": "127.0.0.1:10809"}
    snap = SourceStatus(
        source="host1", connected=True, pid=7, updated=123.0, rate_limit=1e6, window="08-18",
        volumes=(SourceVolumeStatus("a", phase="idle", acked_epoch=4, stats={"wire": 9.0},
                                    current_as_of=100.0, lag=1.0),
                 SourceVolumeStatus("b", mode="nbd", nbd=nbd, paused=True, paused_since=50.0)),
        filesets=({"fileset": "etc", "files": 3, "refused": {}},))
    d = json.loads(json.dumps(snap.to_dict()))
    assert set(d) == SOURCE_KEYS
    assert set(d["volumes"][0]) == SOURCE_VOLUME_KEYS  # no nbd key for a scan volume
    assert set(d["volumes"][1]) == SOURCE_VOLUME_KEYS | {"nbd"} and d["volumes"][1]["nbd"] == nbd
    assert SourceStatus.from_dict(d) == snap
    # later: the lag as of the reader's clock
    assert snap.volumes[0].at(160.0).lag == 60.0 and snap.volumes[1].at(160.0).lag is None


def test_source_status_reads_older_and_newer_files() -> None:
    old = SourceStatus.from_dict({"connected": True, "volumes": [{"volume": "a", "phase": "idle"}]})
    assert old.source == "" and old.connected and old.filesets == ()
    assert old.volumes[0].phase == "idle" and old.volumes[0].stats == {}
    newer = SourceVolumeStatus.from_dict({"volume": "a", "some_future_field": 1})
    assert newer == SourceVolumeStatus("a")


def test_source_volume_snapshot(tmp_path: Path) -> None:
    vs = VolumeState(VolumeConfig(name="v", path=tmp_path / "v.img"), tmp_path / "state")
    vs.geo = GEO
    vs.acked, vs._phase, vs.current_as_of = 5, Phase.IDLE, time.time() - 3  # a state, not a transition
    vs.stats["wire"] = 77
    st = vs.status()
    assert (st.volume, st.acked_epoch, st.phase, st.size, st.stats["wire"]) == ("v", 5, "idle",
                                                                             GEO.size, 77)
    assert st.lag is not None and 2 < st.lag < 60 and st.nbd is None and not st.paused
    vs.status_extra = lambda: {"nbd": {"mode": "tracking"}}
    assert vs.status().nbd == {"mode": "tracking"}
    vs.stats["wire"] = 78
    assert st.stats["wire"] == 77  # a snapshot: later counts do not leak into it


def write_epoch(rep: Replica, rng: random.Random, epoch: int) -> None:
    w = rep.begin(epoch, T0 + epoch)
    idx = sorted(rng.sample(range(GEO.blocks), 3))
    blocks = [rng.randbytes(BS) for _ in idx]
    data = b"".join(blocks)
    w.add_data(pack_u64(idx), b"".join(block_hash(b) for b in blocks), len(data), compress(data))
    w.seal(w.blocks)
    w.apply()


@pytest.fixture
def receiver(tmp_path: Path):
    (tmp_path / "receiver.toml").write_text(
        f'[receiver]\nlisten = "127.0.0.1:7400"\ndata_dir = "{tmp_path / "replicas"}"\n')
    rx = Receiver(load_receiver(tmp_path / "receiver.toml"))
    yield rx
    for rep in rx.replicas.values():
        rep.close()
    rx.pool.shutdown()


def test_receiver_snapshot_and_cdp_status_say_the_same(receiver: Receiver) -> None:
    """The running receiver's snapshot (status page, metrics) and `cdp status` reading the files
    come from one builder: for the same replica they agree field by field."""
    data = receiver.cfg.data_dir
    rep = Replica.open(data, "vol1", GEO, create=True)
    rng = random.Random(3)
    for e in range(1, 5):
        write_epoch(rep, rng, e)
    receiver.replicas["vol1"] = rep
    receiver.live["vol1"] = VolumeLive(client="host1", current_as_of=T0 + 10)
    receiver.owners["vol1"] = 1
    now = time.time()
    snap = receiver.status(now)
    assert snap.connections == 0 and snap.data_dir == str(data)
    (v,) = snap.volumes
    points = list_points(data / "vol1")
    assert v.epoch == 4 and v.points == len(points) >= 2
    assert v.oldest_point_epoch == points[0].epoch and v.oldest_point_time == points[0].time
    assert v.journal_bytes == sum(p.size for p in points) > 0
    assert v.window == pytest.approx(now - points[0].time)
    assert v.lag == pytest.approx(now - (T0 + 10)) and v.connected and v.client == "host1"
    assert v.pending_epochs == 0 and v.receiving is False and not v.promoted

    receiver._write_status()  # what `cdp status` reads while the receiver runs
    written = json.loads((data / "vol1" / "status.json").read_text())
    assert set(written) == {"client", "connected", "current_as_of", "rate", "wire_rate", "error",
                            "updated", "pid"}
    (off,) = receiver_volumes(data, now)
    live_view = v.to_dict()
    del live_view["pending_epochs"], live_view["receiving"]
    assert off.to_dict() == live_view


def test_receiver_snapshot_counts_epochs_in_flight(receiver: Receiver) -> None:
    rep = Replica.open(receiver.cfg.data_dir, "vol1", GEO, create=True)
    receiver.replicas["vol1"] = rep

    async def main() -> VolumeStatus:
        # two connections' sinks: one with two sealed epochs awaiting their answer, one
        # receiving an epoch
        hold = asyncio.Event()
        applying, arriving = VolumeSink("vol1"), VolumeSink("vol1")
        for e in (1, 2):
            applying.answer(e, hold.wait())
        arriving.begin(cast(EpochWriter, object()))
        for key, sink in ((1, applying), (2, arriving)):
            conn = Connection.__new__(Connection)  # only its sinks matter here
            conn.sinks = {"vol1": sink}
            receiver._by_id[key] = conn
        await asyncio.sleep(0)
        (v,) = receiver.status().volumes
        hold.set()
        await applying.close()
        assert applying.queued == 0
        return v

    v = asyncio.run(main())
    assert v.pending_epochs == 2 and v.receiving is True
    assert not v.connected and v.client == "" and v.lag is None  # nothing captured yet
