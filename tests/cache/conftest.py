"""A real redis-server for the cache store contract suites (one per test module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.storage.embedded import EmbeddedRedis
from tests.helpers.redis_server import redis_server


@pytest.fixture(scope="module")
def real_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with redis_server(tmp_path_factory.mktemp("cache-redis")) as server:
        yield server
