"""Local clusters take their ports below the kernel's ephemeral range."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cluster import cluster_ports, ephemeral_port_low, free_base_port


def test_every_port_of_a_free_base_is_below_the_ephemeral_range() -> None:
    ceiling = ephemeral_port_low()
    for size in (1, 3, 5):
        for _ in range(20):
            ports = cluster_ports(free_base_port(size), size)
            assert max(ports) < ceiling, (size, ports)


def test_the_ephemeral_range_is_read_from_the_kernel_or_defaults(tmp_path: Path) -> None:
    given = tmp_path / "range"
    given.write_text("40000\t60999\n")
    assert ephemeral_port_low(str(given)) == 40000
    assert ephemeral_port_low(str(tmp_path / "missing")) == 32768
    given.write_text("garbage")
    assert ephemeral_port_low(str(given)) == 32768


def test_no_room_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no room"):
        free_base_port(3, low=30_000, high=30_000)
