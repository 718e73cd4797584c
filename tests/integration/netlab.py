"""Network namespaces for partition tests: each node on its own address, links that cut.

`NetLab(size)` builds, with `ip` (root needed):
- one network namespace per node, each with its own loopback (so its embedded Redis on
  127.0.0.1 stays private) and one veth interface with address 10.X.Y.<i+1>/24;
- a bridge in the test's own namespace holding the other ends, address 10.X.Y.254, so
  the test process reaches every node directly, whatever is cut between the nodes.

`cut(a, b)` partitions nodes a and b from each other: a blackhole route to the other's
address in both namespaces. Packets between them are dropped, in both directions, while
each still talks to the test and to the rest: a new connection fails at once (the local
route refuses it) and an open one just stops carrying anything - it hangs until a
timeout or a ping notices, as a real partition does. `heal()` removes every cut.

Everything it creates has a random 4-hex tag in its name and is removed by `close()`
(deleting a namespace deletes its veth pair); a run killed before that leaves names
starting with "dsl" behind, which `ip netns list` and `ip link` show.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence

NAME_PREFIX = "dsl"


class NetLabUnavailable(RuntimeError):
    """This machine cannot build the lab (not root, no `ip`, no namespaces)."""


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")


class NetLab:
    def __init__(self, size: int) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise NetLabUnavailable("needs root and the `ip` command")
        tag = secrets.token_hex(2)
        self.size = size
        self.bridge = f"{NAME_PREFIX}{tag}b"
        self.namespaces = [f"{NAME_PREFIX}{tag}n{i + 1}" for i in range(size)]
        # 10.200-249.x.0/24: a random subnet, so two labs (or two test runs) never share one.
        rng = secrets.SystemRandom()
        subnet = f"10.{rng.randrange(200, 250)}.{rng.randrange(0, 256)}"
        self.addresses = [f"{subnet}.{i + 1}" for i in range(size)]
        self.gateway = f"{subnet}.254"
        self._cuts: set[tuple[int, int]] = set()
        try:
            self._build(tag)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            self.close()
            raise NetLabUnavailable(f"cannot build network namespaces here: {exc}") from exc

    def _build(self, tag: str) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (ns, address) in enumerate(zip(self.namespaces, self.addresses, strict=True)):
            outer, inner = f"{NAME_PREFIX}{tag}h{i + 1}", f"{NAME_PREFIX}{tag}v{i + 1}"
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", netns=ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("addr", "add", f"{address}/24", "dev", inner, netns=ns)
            _ip("link", "set", inner, "up", netns=ns)

    def launcher(self, index: int) -> tuple[str, ...]:
        """The command prefix that runs a program inside node `index`'s namespace."""
        return ("ip", "netns", "exec", self.namespaces[index])

    # --- faults --------------------------------------------------------------------

    def cut(self, a: int, b: int) -> None:
        if a == b or (min(a, b), max(a, b)) in self._cuts:
            return
        _ip("route", "add", "blackhole", f"{self.addresses[b]}/32", netns=self.namespaces[a])
        _ip("route", "add", "blackhole", f"{self.addresses[a]}/32", netns=self.namespaces[b])
        self._cuts.add((min(a, b), max(a, b)))

    def isolate(self, index: int, others: Sequence[int] | None = None) -> None:
        """Cut `index` off from every other node (or from `others`)."""
        for other in others if others is not None else range(self.size):
            if other != index:
                self.cut(index, other)

    def heal(self) -> None:
        for a, b in sorted(self._cuts):
            _ip("route", "del", "blackhole", f"{self.addresses[b]}/32", netns=self.namespaces[a])
            _ip("route", "del", "blackhole", f"{self.addresses[a]}/32", netns=self.namespaces[b])
        self._cuts.clear()

    # --- teardown ------------------------------------------------------------------

    def close(self) -> None:
        """Remove what was built; safe to call twice and after a partial build."""
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10,
                           check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=10,
                       check=False)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
