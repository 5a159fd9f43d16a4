"""Pod IP allocation from a loopback range.

Linux routes all of 127.0.0.0/8 to ``lo``, so every address of the range is
bindable without any setup; giving each pod its own address lets two pods
listen on the same port, as they could in a real cluster.
"""

from __future__ import annotations

import ipaddress
import threading


class PoolExhausted(Exception):
    """Every address of the range is in use."""


class IPPool:
    """Hands out the usable host addresses of a range, round-robin from ``start``.

    Round-robin rather than lowest-free so a just-released address is reused
    last: a client that still holds a stale pod IP then finds nothing there
    instead of a different pod. ``start`` is an offset into the range (0 is
    the first host address, 127.1.0.1 for 127.1.0.0/16).
    """

    def __init__(self, cidr: str, start: int = 0) -> None:
        network = ipaddress.IPv4Network(cidr)
        if network.num_addresses > 2:
            self._first = int(network.network_address) + 1
            self._size = network.num_addresses - 2
        else:
            self._first = int(network.network_address)
            self._size = network.num_addresses
        self._next = start % self._size
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def _contains(self, address: int) -> bool:
        return self._first <= address < self._first + self._size

    def allocate(self, preferred: str | None = None) -> str:
        """Reserve ``preferred`` when it is in the range and free, else the next free address."""
        with self._lock:
            if preferred:
                wanted = int(ipaddress.IPv4Address(preferred))
                if self._contains(wanted) and wanted not in self._used:
                    self._used.add(wanted)
                    return str(ipaddress.IPv4Address(wanted))
            for step in range(self._size):
                offset = (self._next + step) % self._size
                address = self._first + offset
                if address not in self._used:
                    self._used.add(address)
                    self._next = (offset + 1) % self._size
                    return str(ipaddress.IPv4Address(address))
            raise PoolExhausted(f"no free pod IP left in a range of {self._size} addresses")

    def release(self, ip: str) -> None:
        """Return ``ip`` to the pool; releasing an address not handed out does nothing."""
        with self._lock:
            self._used.discard(int(ipaddress.IPv4Address(ip)))
