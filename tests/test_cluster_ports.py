"""Local clusters: ports below the kernel's ephemeral range, and nodes on given addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cluster import LocalCluster, cluster_ports, ephemeral_port_low, free_base_port


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


def test_nodes_on_their_own_addresses_find_each_other_there(tmp_path: Path) -> None:
    hosts = ["10.9.0.1", "10.9.0.2", "10.9.0.3"]
    launchers = [("ip", "netns", "exec", f"ns{i}") for i in range(3)]
    c = LocalCluster(size=3, base_port=7000, data_root=tmp_path, hosts=hosts,
                     launchers=launchers)
    assert [n.url for n in c.nodes] == [f"http://{h}:{7000 + i}" for i, h in enumerate(hosts)]
    assert c.nodes[1].env["HOST"] == "10.9.0.2"
    assert c.nodes[1].env["PEERS"] == "node1=http://10.9.0.1:7000,node3=http://10.9.0.3:7002"
    assert c.nodes[2].launcher == launchers[2]
    assert LocalCluster(size=2, data_root=tmp_path).nodes[0].url == "http://127.0.0.1:8001"


def test_hosts_and_launchers_need_one_entry_per_node(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one entry per node"):
        LocalCluster(size=3, data_root=tmp_path, hosts=["10.9.0.1"])
