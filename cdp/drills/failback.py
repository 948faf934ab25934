"""`cdp failback`: after `cdp failover promote`, bring the original site back in line with
the promoted DR image, shipping only the blocks that differ.

Replication simply runs in reverse, reusing the normal paths:

1. ``prepare`` (original site, its VM stopped): the original image becomes a
   receiver-side replica. Layout of ``DIR/``::

       receiver.toml          a receiver config: listen address, one client, one volume
       failback.token         the client's token (0600), unless --token-file names one
       replicas/<VOL>/image   a symlink to the original image: it is written in place
       replicas/<VOL>/hashes  xxh3-128 of every block, computed by reading the image now
                              (so blocks changed after the last applied epoch count too)
       replicas/<VOL>/state.json   a fresh replica id at epoch 1

   Then ``cdp receiver -c DIR/receiver.toml`` serves it.

2. ``run`` (DR site): a one-shot scan-mode source over the promoted image
   (``<data_dir>/VOL/image``). On connect it finds a replica it does not know,
   fetches its hash map (16 bytes per block) and sends only blocks whose hash
   differs: those written on the DR side since the promote and those the
   original site changed after the last epoch the DR site applied. It stops
   once the receiver acknowledged the whole scan and reports what it sent.

   A completed run records in ``<data_dir>/VOL/failback.json`` which promote it
   belongs to and a digest of the hash map of what it shipped (the source's
   map once every epoch was acknowledged: exactly what the original image
   holds now). A run or finish holds ``VOL/failback.lock`` (flock): one at a
   time; each removes the work folders (``<data_dir>/.failback-VOL-*``, the
   run's source state) that killed runs left, and so does the receiver when it
   starts (cdp.drills.workdirs).

Every epoch is applied through the receiver's WAL, so an interrupted failback
leaves the original image at a whole epoch; running ``run`` again finishes it.

3. ``finish`` (DR site, the DR machine stopped, before the original site's
   source starts): the promoted image becomes a replica again so forward
   replication resumes without a reseed: its hash map is recomputed from the
   image, it gets a new replica id (so the source fetches that map and sends
   only what differs) and promoted.json is kept as ``promoted-<time>.json``.
   It refuses unless a run of this promote completed and the image still
   hashes as what that run shipped: otherwise the original site lacks DR
   writes that its source would then overwrite (``discard_dr_writes`` accepts
   that loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import xxhash

from cdp.blocks import Geometry
from cdp.codec import HASH_LEN, block_hash, zero_hash
from cdp.config import SourceConfig, VolumeConfig, load_receiver, load_source, read_token
from cdp.drills.workdirs import WORK_PREFIX, exclusive
from cdp.durable import DIR_MODE, atomic_write_json, create_private, fsync_dir, make_private_dir, read_json
from cdp.errors import CdpError, DrillError, UsageError
from cdp.replica.journal import Retention
from cdp.replica.state import ReplicaState
from cdp.replica.store import PROMOTED, Replica
from cdp.tracker.scan import volume_size
from cdp.units import parse_hostport

log = logging.getLogger(__name__)

CLIENT = "failback"
READ_CHUNK = 4 * 1024 * 1024
STATUS_FRESH = 10.0


def _hostport(text: str, flag: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise UsageError(f"{flag} {text!r}: {exc}") from None


def _source_running(state_dir: Path) -> int | None:
    """The pid of a source daemon that still writes its status file, else None."""
    try:
        st = read_json(state_dir / "status.json")
    except (OSError, ValueError):
        return None
    pid = st.get("pid")
    if not isinstance(pid, int) or time.time() - float(st.get("updated", 0)) > STATUS_FRESH:
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


def _hash_image(image: Path, geo: Geometry, out: Path) -> tuple[int, str]:
    """Write the replica hash map of `image` (16 zero bytes for an all-zero block);
    returns the number of blocks that hold data and the map's xxh3-128 (equal maps of equal
    images, given the canonical form of _canonical)."""
    used = 0
    digest = xxhash.xxh3_128()
    zero = bytes(geo.block_size)
    fd = os.open(image, os.O_RDONLY)
    try:
        with create_private(out) as fh:
            fh.truncate(geo.blocks * HASH_LEN)
            per = max(1, READ_CHUNK // geo.block_size)
            for first in range(0, geo.blocks, per):
                n = min(per, geo.blocks - first)
                buf = os.pread(fd, n * geo.block_size, first * geo.block_size)
                hashes = bytearray(n * HASH_LEN)
                for i in range(n):
                    blk = buf[i * geo.block_size:(i + 1) * geo.block_size]
                    if blk and blk != zero[:len(blk)]:
                        hashes[i * HASH_LEN:(i + 1) * HASH_LEN] = block_hash(blk)
                        used += 1
                digest.update(hashes)
                if any(hashes):
                    fh.seek(first * HASH_LEN)
                    fh.write(hashes)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        os.close(fd)
    return used, digest.hexdigest()


def _canonical(hashes: bytes | bytearray, geo: Geometry) -> bytearray:
    """A hash map with every all-zero block as 16 zero bytes (the source writes zero_hash)."""
    out = bytearray(hashes)
    for z in {zero_hash(geo.block_size), zero_hash(geo.length(geo.blocks - 1))}:
        pos = out.find(z)
        while pos >= 0:
            if pos % HASH_LEN == 0:
                out[pos:pos + HASH_LEN] = bytes(HASH_LEN)
            pos = out.find(z, pos + 1)
    return out


def _differing(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """How many blocks two (canonical) hash maps disagree on."""
    n = 0
    step = 4096 * HASH_LEN
    for off in range(0, len(a), step):
        if a[off:off + step] != b[off:off + step]:
            n += sum(1 for i in range(off, min(off + step, len(a)), HASH_LEN)
                     if a[i:i + HASH_LEN] != b[i:i + HASH_LEN])
    return n


def prepare(source_toml: Path, volume: str, listen: str, folder: Path, *,
            token_file: Path | None = None, tls_cert: Path | None = None,
            tls_key: Path | None = None, allow_plaintext: bool = False) -> dict[str, Any]:
    """Make the original image of `volume` a replica under `folder`, and a receiver config."""
    cfg = load_source(source_toml)
    vc = cfg.volume(volume)
    if vc is None:
        raise UsageError(f"{source_toml} has no volume {volume!r}")
    pid = _source_running(cfg.state_dir)
    if pid is not None:
        raise DrillError(f"the source daemon (pid {pid}) is still running with {source_toml}: "
                         "stop it (and the VM using the image) before failback")
    host, port = _hostport(listen, "--listen")
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    image = Path(os.path.realpath(vc.path))
    geo = Geometry(volume_size(image), vc.block_size)
    folder = folder.resolve()
    data_dir = folder / "replicas"
    vol_dir = data_dir / volume
    make_private_dir(data_dir)
    if vol_dir.exists():  # a second prepare rebuilds it; never under a running receiver
        os.close(Replica._lock(vol_dir, volume))  # ReplicaBusy if a receiver holds it
        shutil.rmtree(vol_dir)
    tmp = data_dir / f".{volume}.new"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, DIR_MODE)
    (tmp / "image").symlink_to(image)
    used, _ = _hash_image(image, geo, tmp / "hashes")
    state = ReplicaState(volume, geo.size, geo.block_size, uuid.uuid4().hex, time.time(),
                         epoch=1, epoch_time=time.time())
    atomic_write_json(tmp / "state.json", asdict(state))
    os.rename(tmp, vol_dir)
    fsync_dir(data_dir)

    if token_file is None:
        token_file = folder / "failback.token"
    token_file = token_file.resolve()
    if not token_file.exists():
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(os.urandom(32).hex() + "\n")
    toml = folder / "receiver.toml"
    lines = ["# written by `cdp failback prepare`: serves the original image of "
             f"{volume} as a replica", "[receiver]", f"listen = {json.dumps(f'{host}:{port}')}",
             'data_dir = "replicas"', 'keep_points_size = "0"  # no recovery points: failback only']
    if allow_plaintext:
        lines.append("allow_plaintext = true")
    if tls_cert is not None and tls_key is not None:
        lines += ["[receiver.tls]", f"cert = {json.dumps(str(tls_cert.resolve()))}",
                  f"key = {json.dumps(str(tls_key.resolve()))}"]
    lines += ["", "[[receiver.client]]", f'name = "{CLIENT}"',
              f"token_file = {json.dumps(str(token_file))}", f"volumes = {json.dumps([volume])}",
              ""]
    toml.write_text("\n".join(lines))
    load_receiver(toml)  # refuses e.g. a non-loopback address without TLS, naming the key
    return {"volume": volume, "image": str(image), "size": geo.size,
            "block_size": geo.block_size, "blocks": geo.blocks, "blocks_with_data": used,
            "receiver_config": str(toml), "token_file": str(token_file),
            "listen": f"{host}:{port}", "replica_id": state.replica_id}


def promoted_record(data_dir: Path, volume: str) -> dict[str, Any]:
    """promoted.json of a volume that `cdp failover promote` finished; DrillError otherwise."""
    vol_dir = data_dir / volume
    if not (vol_dir / "state.json").exists():
        raise UsageError(f"no replica of volume {volume!r} in {data_dir}")
    try:
        rec = read_json(vol_dir / PROMOTED)
    except (OSError, ValueError):
        rec = {}
    if rec.get("state") != "promoted":
        raise DrillError(f"volume {volume!r} is not promoted: failback ships a promoted DR "
                         f"image back to the original site. Run `cdp failover promote` first "
                         "(or, if this is the original site, use `cdp failback prepare`)")
    return rec


def run(receiver_toml: Path, volume: str, to: str, token_file: Path, *,
        tls_ca: Path | None = None, timeout: float = 24 * 3600.0) -> dict[str, Any]:
    """Ship the promoted image of `volume` to a failback receiver until it matches."""
    rcfg = load_receiver(receiver_toml)
    rec = promoted_record(rcfg.data_dir, volume)
    host, port = _hostport(to, "--to")
    token = read_token(token_file, receiver_toml, "--token-file")
    with exclusive(rcfg.data_dir, volume) as removed:
        work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{volume}-", dir=rcfg.data_dir))
        try:
            out, shipped = _run(rcfg.data_dir / volume, work, receiver_toml, token,
                                (host, port), tls_ca, timeout)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    out.update(promoted_epoch=rec.get("epoch"), removed_leftovers=removed)
    record = {**out, "promoted_at": rec.get("promoted_at"), "completed_at": time.time(),
              "shipped_digest": xxhash.xxh3_128_hexdigest(bytes(shipped))}
    try:
        atomic_write_json(rcfg.data_dir / volume / "failback.json", record)
    except OSError as exc:
        raise DrillError(f"the original image now matches, but {rcfg.data_dir / volume} "
                         f"could not record it ({exc}); `cdp failback finish` needs that "
                         "record: fix the cause and run again (nothing is sent twice)") from None
    return out


def _run(vol_dir: Path, work: Path, receiver_toml: Path, token: bytes, to: tuple[str, int],
         tls_ca: Path | None, timeout: float) -> tuple[dict[str, Any], bytearray]:
    """One scan-mode source over the promoted image, until the receiver acknowledged it all;
    returns the report and the canonical hash map of what the original image now holds."""
    from cdp.config import TlsClient
    from cdp.source.daemon import Source

    volume = vol_dir.name
    st = read_json(vol_dir / "state.json")
    vcfg = VolumeConfig(volume, vol_dir / "image", "scan", int(st["block_size"]),
                        scan_interval=1e9, min_scan_interval=0.0)
    cfg = SourceConfig(receiver_toml, CLIENT, to, token, work, (vcfg,),
                       tls=TlsClient(ca=tls_ca) if tls_ca else None, reconnect_max=5.0)
    src = Source(cfg)
    vs = src.volumes[volume]
    first: list[bytes] = []  # the original image's map as first fetched: what it held

    def adopted(smap: bytearray) -> None:
        if not first:
            first.append(bytes(smap))

    vs.on_adopt = adopted
    t0 = time.time()
    out = asyncio.run(_ship(src, volume, t0, timeout, f"{to[0]}:{to[1]}"))
    assert vs.smap is not None and vs.geo is not None and first
    shipped = _canonical(vs.smap, vs.geo)  # every epoch acknowledged: what the original holds
    out.update(volume=volume, image=str(vol_dir / "image"),
               blocks_sent=_differing(_canonical(first[0], vs.geo), shipped),
               seconds=round(time.time() - t0, 3))
    return out, shipped


def finish(data_dir: Path, volume: str, *, discard_dr_writes: bool = False) -> dict[str, Any]:
    """Turn a promoted (and failed-back) image into a replica the receiver accepts again.

    Refused (DrillError) unless a `run` of this promote completed and the image still hashes
    as what it shipped, or `discard_dr_writes`: the original site's source would otherwise
    overwrite DR writes the original does not have.
    """
    rec = promoted_record(data_dir, volume)
    with exclusive(data_dir, volume):
        return _finish(data_dir, volume, rec, discard_dr_writes)


def _finish(data_dir: Path, volume: str, rec: dict[str, Any],
            discard_dr_writes: bool) -> dict[str, Any]:
    vol_dir = data_dir / volume
    try:
        shipped = read_json(vol_dir / "failback.json")
    except (OSError, ValueError):
        shipped = {}
    rep = Replica.open(data_dir, volume, retention=Retention(None, None), promoting=True)
    try:
        state = rep.state
        tmp = vol_dir / "hashes.new"
        used, digest = _hash_image(vol_dir / "image", state.geometry, tmp)
        problem = ""
        if (not isinstance(shipped, dict) or "shipped_digest" not in shipped
                or shipped.get("promoted_at") != rec.get("promoted_at")):
            problem = f"no `cdp failback run` of {volume!r} completed since it was promoted"
        elif shipped["shipped_digest"] != digest:
            when = time.strftime("%Y-%m-%d %H:%M:%S",
                                 time.localtime(float(shipped.get("completed_at", 0))))
            problem = (f"the DR image of {volume!r} changed after the last completed "
                       f"`cdp failback run` ({when})")
        if problem and not discard_dr_writes:
            os.unlink(tmp)
            raise DrillError(f"{problem}: the original site does not hold what was written "
                             "on the DR side, and its source would overwrite it once "
                             "replication resumes. Stop the DR machine, run `cdp failback run` "
                             "again, then finish (or pass --discard-dr-writes to finish anyway "
                             "and lose those writes)")
        if problem:
            log.warning("failback finish of %s: %s; those DR writes are discarded as asked",
                        volume, problem)
        os.replace(tmp, vol_dir / "hashes")
        old_id = state.replica_id
        state.replica_id = uuid.uuid4().hex
        state.epoch_time = time.time()
        atomic_write_json(vol_dir / "state.json", asdict(state))
        stamp = int(time.time())
        kept = vol_dir / f"promoted-{stamp}.json"
        os.replace(vol_dir / PROMOTED, kept)
        with contextlib.suppress(FileNotFoundError):  # kept beside it; never matches a new promote
            os.replace(vol_dir / "failback.json", vol_dir / f"failback-{stamp}.json")
        fsync_dir(vol_dir)
    finally:
        rep.close()
    return {"volume": volume, "epoch": state.epoch, "replica_id": state.replica_id,
            "previous_replica_id": old_id, "blocks": state.geometry.blocks,
            "blocks_with_data": used, "promoted_record": str(kept),
            "promoted_at": rec.get("promoted_at"), "verified": not problem,
            "discarded_dr_writes": bool(problem)}


async def _ship(src: Any, volume: str, t0: float, timeout: float, where: str) -> dict[str, Any]:
    task = asyncio.create_task(src.run())
    vs = src.volumes[volume]
    deadline = time.monotonic() + timeout
    sent = 0
    try:
        while True:
            await asyncio.sleep(0.1)
            if src.link is not None:
                sent = max(sent, src.link.sent_bytes)
            if task.done():
                task.result()
                raise DrillError("the failback source stopped unexpectedly")
            if vs.phase == "failed":
                raise DrillError(f"failback of {volume!r} failed: {vs.error}")
            if vs.current_as_of >= t0 and not vs.pending and vs.seeded:
                break
            if time.monotonic() > deadline:
                what = vs.error or (f"phase {vs.phase}" if src.connected else
                                    f"cannot reach the failback receiver at {where}; is "
                                    "`cdp receiver -c DIR/receiver.toml` running there?")
                raise DrillError(f"failback of {volume!r} did not finish within "
                                 f"{timeout:.0f}s: {what}")
    finally:
        src.stop()
        with contextlib.suppress(CdpError, asyncio.CancelledError):
            async with asyncio.timeout(30):
                await task
    s = vs.stats
    bs = vs.geo.block_size
    return {"block_sends": int((s["data"] + s["zero"] + s["dedup"] + bs - 1) // bs),
            "blocks": vs.geo.blocks, "bytes_sent": sent, "data_bytes": int(s["data"]),
            "compressed_bytes": int(s["compressed"]), "zero_bytes": int(s["zero"]),
            "epochs": int(s["epochs"]), "hash_map_bytes": vs.geo.blocks * HASH_LEN}
