"""`python -m service ...`: operator commands.

cluster up --nodes N     run a local N-node cluster in the foreground (Ctrl-C stops it;
                         data stays in ./data, so running it again resumes)
drill failover|restart-all|disk-loss   (see service/drills.py)
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from service.cluster import LocalCluster, cluster_ports, port_free


def _stop_on_signal(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(0)


def cluster_up(nodes: int, base_port: int, data_root: Path) -> int:
    cluster = LocalCluster(
        size=nodes,
        base_port=base_port,
        data_root=data_root,
        extra_env={"LOG_FORMAT": "text"},
    )
    busy = [p for p in cluster_ports(base_port, nodes) if not port_free(p)]
    if busy:
        # Otherwise whatever answers there (an earlier cluster?) would pass for this one.
        print(
            f"dsync: ports {', '.join(map(str, busy))} on 127.0.0.1 are in use; stop what "
            "uses them or pass another --base-port",
            file=sys.stderr,
        )
        return 1
    # SIGTERM (kill, a supervisor) must stop the nodes too, not orphan them: it becomes
    # SystemExit so the finally below runs, as Ctrl-C does. Either signal ignores further
    # ones at once: a second one (`timeout` forwarding the TERM it got, an impatient
    # Ctrl-C) would otherwise cut the shutdown short.
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    print(f"dsync: starting {nodes} nodes, data in {data_root}/", flush=True)
    cluster.start()
    try:
        leader = cluster.wait_for_leader(timeout=60)
        print(
            f"dsync: cluster is up; leader is {cluster.nodes[leader].node_id}. Nodes: "
            + ", ".join(f"{n.node_id}={n.url}" for n in cluster.nodes)
            + "  (Ctrl-C stops)",
            flush=True,
        )
        while True:
            for node in cluster.nodes:
                if node.process is not None and node.process.poll() is not None:
                    print(
                        f"dsync: {node.node_id} exited ({node.process.returncode})",
                        file=sys.stderr,
                        flush=True,
                    )
                    node.process = None
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\ndsync: stopping the cluster ...", flush=True)
        return 0
    except (TimeoutError, RuntimeError) as exc:
        print(f"dsync: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        print("dsync: stopped", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service")
    sub = parser.add_subparsers(dest="command", required=True)
    cluster = sub.add_parser("cluster", help="local cluster")
    cluster_sub = cluster.add_subparsers(dest="action", required=True)
    up = cluster_sub.add_parser("up", help="run a local cluster in the foreground")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--base-port", type=int, default=8001)
    up.add_argument("--data", type=Path, default=Path("data"))
    drill = sub.add_parser("drill", help="failure drills against a fresh local cluster")
    drill.add_argument("scenario", choices=["failover", "restart-all", "disk-loss"])
    drill.add_argument("--nodes", type=int, default=3)
    drill.add_argument("--base-port", type=int, default=8101)
    drill.add_argument("--clients", type=int, default=16)
    drill.add_argument("--seconds", type=float, default=5.0)
    drill.add_argument("--data", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "cluster":
        if not 1 <= args.nodes <= 9:
            parser.error("--nodes must be 1..9")
        return cluster_up(args.nodes, args.base_port, args.data)
    from service.drills import run_drill

    return run_drill(args)


if __name__ == "__main__":
    sys.exit(main())
