"""Free TCP ports on loopback, for private servers (tests, benchmarks).

    from flannel.handlers.ports import free_ports
    inference, management = free_ports(2)

A port found free can be taken by another process before TorchServe binds it (the kernel hands
the same ephemeral ports to outgoing connections). Nothing can hold a port for a server in
another process, so this module remembers which ports it handed out: a config whose every port
came from here was generated for a private server, and ``flannel.handlers.ts_process.start_server``
gives it new ports and starts again when TorchServe finds one taken.
"""
from __future__ import annotations

import threading

_issued: set[int] = set()
_lock = threading.Lock()


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (remembered as handed out here)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
    with _lock:
        _issued.update(ports)
    return ports


def handed_out(ports: list[int]) -> bool:
    """True when every one of ``ports`` came from ``free_ports`` in this process."""
    with _lock:
        return bool(ports) and all(p in _issued for p in ports)
