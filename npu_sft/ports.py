"""The one port probe: whether a TCP port can be bound right now.

SO_REUSEADDR is set as the servers we start set it (uvicorn, torchrun's store, Prefect's and MLflow's servers): a port
whose last connection is still in TIME_WAIT counts as free, because they can bind it; a port something listens on
does not, on any host or interface.
"""

from __future__ import annotations

import socket


def port_is_free(port: int, host: str = "") -> bool:
    """Whether nothing (ours or anyone's) listens on `port` on `host` ("" = every interface) right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def unused_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, the OS's pick, for a server started next by a test or a benchmark (the
    pipeline's own ports come from settings, and torchrun's from the device lease's reservation)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
