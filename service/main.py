"""Start one node: `python -m service.main --node node1 --port 8000`.

Settings come from the environment and `.env`, with flags over both. A bad setting or a
failure to start (port in use, Redis unreachable) prints one clear line and exits 2/1,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from service.config import ConfigError, Settings, add_cli_arguments, load_settings
from service.logs import setup_logging

log = logging.getLogger("dsync.main")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.main", description="Run one dsync node."
    )
    # --node is the course prototype's spelling; --node-id (from the settings) works too.
    parser.add_argument("--node", dest="NODE_ID_ALIAS", default=None, help="Same as --node-id.")
    add_cli_arguments(parser)
    return parser


def parse_settings(argv: Sequence[str] | None) -> Settings:
    args = vars(build_parser().parse_args(argv))
    alias = args.pop("NODE_ID_ALIAS")
    if alias is not None and args.get("NODE_ID") is None:
        args["NODE_ID"] = alias
    return load_settings(args)


async def run_node(settings: Settings) -> int:
    from service.api.app import create_app
    from service.node import Node, StartupError
    from service.services import install_services

    node = Node(settings)
    install_services(node)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    # A start can wait a long time (Redis coming up; a node that lost its storage waits
    # for every peer): a signal meanwhile stops it instead of being ignored until then.
    starting = asyncio.ensure_future(node.start(create_app))
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        log.info("stopped while starting")
        await node.stop()
        return 0
    stop_wait.cancel()
    try:
        starting.result()
    except StartupError as exc:
        print(f"dsync: {settings.node_id}: {exc}", file=sys.stderr)
        await node.stop()
        return 1
    assert node.runner is not None
    runner_done = asyncio.ensure_future(node.runner.wait_stopped())
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait({runner_done, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    failed = node.runner.fatal_error
    stop_wait.cancel()
    runner_done.cancel()
    log.info("stopping")
    await node.stop()
    if failed is not None:
        print(f"dsync: {settings.node_id}: stopped after an error: {failed}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ConfigError as exc:
        print(f"dsync: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.node_id, settings.log_level, settings.log_format)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(run_node(settings))
    except KeyboardInterrupt:
        return 130


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the node spends most of its CPU in socket I/O, which
    libuv does in C."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
