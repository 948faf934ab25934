"""`cdp failback prepare|run|finish`: after a promote, ship back only what differs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cdp.units import format_bytes


def register(sub: Any) -> None:
    f = sub.add_parser(
        "failback", help="after `cdp failover promote`: make the original image match the "
        "promoted one, sending only the blocks that differ",
        description="Two steps. On the ORIGINAL site (its VM and source daemon stopped): "
        "`cdp failback prepare` turns the original image into a replica (hash map computed "
        "by reading it) and writes DIR/receiver.toml; start `cdp receiver -c "
        "DIR/receiver.toml`. On the DR site: `cdp failback run` scans the promoted image and "
        "sends only the blocks whose hash differs; it stops once they are all applied. Then, "
        "the DR machine stopped, `cdp failback finish` makes the promoted image a replica "
        "again.")
    fsub = f.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = fsub.add_parser("prepare", help="original site: serve the original image as a replica")
    p.add_argument("-c", "--config", type=Path, required=True, help="source.toml")
    p.add_argument("volume")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="where the failback receiver will listen")
    p.add_argument("--dir", type=Path, required=True,
                   help="folder for the receiver config, token and replica metadata")
    p.add_argument("--token-file", type=Path,
                   help="token to use (created if missing; default DIR/failback.token); copy "
                   "it to the DR site")
    p.add_argument("--tls-cert", type=Path, help="TLS certificate for the failback receiver")
    p.add_argument("--tls-key", type=Path, help="its key")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="listen on a non-loopback address without TLS (VPN, IPsec)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_prepare)

    r = fsub.add_parser("run", help="DR site: send the promoted image's differing blocks")
    r.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml (DR site)")
    r.add_argument("volume")
    r.add_argument("--to", required=True, metavar="HOST:PORT",
                   help="the failback receiver (prepare's --listen)")
    r.add_argument("--token-file", type=Path, required=True, help="the token prepare wrote")
    r.add_argument("--tls-ca", type=Path, help="CA that signed the failback receiver's cert")
    r.add_argument("--timeout", type=float, default=24 * 3600.0,
                   help="give up after this many seconds (default 1 day)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(run=run_run)

    f2 = fsub.add_parser(
        "finish", help="DR site, after run: make the promoted image a replica again so the "
        "original site's source resumes without a reseed",
        description="Recomputes the replica's hash map from the image, gives it a new replica "
        "id (the source then fetches the map and sends only what differs) and renames "
        "promoted.json to promoted-<time>.json. Run it once the DR machine is shut down and "
        "before the original site's source starts again. Refused (exit 1) unless a "
        "`cdp failback run` of this promote completed and the image has not changed since: "
        "the original site's source would otherwise overwrite the DR side's writes.")
    f2.add_argument("-c", "--config", type=Path, required=True, help="receiver.toml (DR site)")
    f2.add_argument("volume")
    f2.add_argument("--discard-dr-writes", action="store_true",
                    help="finish even though the original site lacks writes made on the DR "
                    "side (no completed run, or the image changed since): they are lost")
    f2.add_argument("--json", action="store_true")
    f2.set_defaults(run=run_finish)


def run_prepare(args: argparse.Namespace) -> int:
    from cdp.drills.failback import prepare

    rep = prepare(args.config, args.volume, args.listen, args.dir, token_file=args.token_file,
                  tls_cert=args.tls_cert, tls_key=args.tls_key,
                  allow_plaintext=args.allow_plaintext)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(f"{rep['image']} is now the failback replica of {rep['volume']} "
              f"({rep['blocks']} blocks, {rep['blocks_with_data']} with data)")
        print(f"start it:      cdp receiver -c {rep['receiver_config']}")
        print(f"then, DR site: cdp failback run -c receiver.toml {rep['volume']} --to "
              f"{rep['listen']} --token-file <copy of {rep['token_file']}>")
    return 0


def run_run(args: argparse.Namespace) -> int:
    from cdp.drills.failback import run

    rep = run(args.config, args.volume, args.to, args.token_file, tls_ca=args.tls_ca,
              timeout=args.timeout)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        resent = rep["block_sends"] - rep["blocks_sent"]
        print(f"failback of {rep['volume']} done in {rep['seconds']:.1f}s: {rep['blocks_sent']} "
              f"of {rep['blocks']} blocks sent, {format_bytes(rep['bytes_sent'])} on the wire"
              + (f" ({resent} more sent again after reconnects)" if resent > 0 else ""))
        for name in rep["removed_leftovers"]:
            print(f"removed {name}, left by a failback run that was killed")
        print("the original image now matches the promoted one; stop the failback receiver")
    return 0


def run_finish(args: argparse.Namespace) -> int:
    from cdp.config import load_receiver
    from cdp.drills.failback import finish

    rep = finish(load_receiver(args.config).data_dir, args.volume,
                 discard_dr_writes=args.discard_dr_writes)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        if rep["discarded_dr_writes"]:
            print("the original site lacks DR writes: they are discarded as asked "
                  "(--discard-dr-writes)")
        print(f"volume {rep['volume']} is a replica again at epoch {rep['epoch']} (new replica "
              f"id {rep['replica_id']}); start the original site's source: it sends only what "
              "differs")
    return 0
