"""Bring a node's Redis to the schema version this code knows, at node start.

The version in ``dsync:schema:version`` is the source of truth; ``dsync:migrations`` is
the human-readable history. A store newer than the code is refused rather than guessed
at: an older node writing an unknown layout could corrupt it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.asyncio import Redis

from service.storage import keys

log = logging.getLogger("dsync.storage")

_MODULE_NAME = re.compile(r"m(\d{4})_\w+")


class MigrationError(Exception):
    """The store cannot be migrated; the message is one line for the operator."""


class SchemaTooNewError(MigrationError):
    pass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    up: Callable[[Redis], Awaitable[None]]


def discover(package: str = "migrations") -> list[Migration]:
    """The migrations in `package`, checked to be numbered 1..N without gaps."""
    found: list[Migration] = []
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        numbered = _MODULE_NAME.fullmatch(info.name)
        if numbered is None:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        expected = int(numbered[1])
        version = getattr(module, "VERSION", None)
        name = getattr(module, "NAME", None)
        up = getattr(module, "up", None)
        if version != expected or not isinstance(name, str):
            raise MigrationError(f"{module.__name__}: VERSION must be {expected}, NAME a str")
        if not inspect.iscoroutinefunction(up):
            raise MigrationError(f"{module.__name__}: up must be an async function")
        found.append(Migration(version, name, up))
    return check_sequence(found)


def check_sequence(migrations: Sequence[Migration]) -> list[Migration]:
    ordered = sorted(migrations, key=lambda m: m.version)
    versions = [m.version for m in ordered]
    if versions != list(range(1, len(ordered) + 1)):
        raise MigrationError(f"migration versions must be 1..N with no gaps, got {versions}")
    return ordered


async def schema_version(redis: Redis) -> int:
    raw = await redis.get(keys.SCHEMA_VERSION)
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise MigrationError(f"{keys.SCHEMA_VERSION} holds {raw!r}, not a version") from None


async def migrate(redis: Redis, *, available: Sequence[Migration] | None = None) -> int:
    """Apply the pending migrations in order; returns the resulting schema version."""
    pending = check_sequence(available) if available is not None else discover()
    known = pending[-1].version if pending else 0
    current = await schema_version(redis)
    if current > known:
        raise SchemaTooNewError(
            f"Redis schema version {current} is newer than this dsync knows ({known}); "
            "run a newer dsync or point REDIS_URL at another Redis"
        )
    for migration in pending[current:]:
        log.info(
            "applying migration", extra={"version": migration.version, "migration": migration.name}
        )
        await migration.up(redis)
        # Recorded after up(), never with it: up() is idempotent, so a crash in between
        # only means running it again.
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.SCHEMA_VERSION, migration.version)
            pipe.hset(
                keys.MIGRATIONS,
                f"{migration.version:04d}_{migration.name}",
                datetime.now(UTC).isoformat(timespec="seconds"),
            )
            await pipe.execute()
        current = migration.version
    return current
