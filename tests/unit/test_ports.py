"""The one port probe."""

from __future__ import annotations

import socket

import pytest

from npu_sft.ports import port_is_free, unused_port


@pytest.mark.parametrize("host", ["", "127.0.0.1"])
def test_a_listening_port_is_taken_and_free_once_closed(host: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_is_free(port, host)
    assert port_is_free(port, host)


def test_a_port_just_left_by_a_connection_is_free_as_servers_rebind_it() -> None:
    # A server that sets SO_REUSEADDR, as uvicorn and torchrun's store do, closes first: its end of the connection
    # sits in TIME_WAIT on `port`, and a probe without SO_REUSEADDR would call the port taken.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()
    client.close()
    assert port_is_free(port, "127.0.0.1")


def test_an_unused_port_can_be_listened_on() -> None:
    port = unused_port()
    assert port_is_free(port, "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        assert not port_is_free(port, "127.0.0.1")
