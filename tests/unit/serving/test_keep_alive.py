"""The long-running server's API key and port checks."""

from __future__ import annotations

import socket

import pytest

from npu_sft.serve_settings import ServeSettings
from npu_sft.serving import API_KEY_VAR, ServeError, check_port_free, load_api_key


def test_keep_serving_needs_a_real_api_key() -> None:
    everywhere = ServeSettings(host="0.0.0.0")
    with pytest.raises(ServeError, match=rf"^serving on 0.0.0.0 needs an API key: {API_KEY_VAR} in the worker"):
        load_api_key(everywhere, {})
    with pytest.raises(ServeError, match="at least 16 characters"):
        load_api_key(everywhere, {API_KEY_VAR: "short"})
    assert load_api_key(everywhere, {API_KEY_VAR: "k" * 32}) == "k" * 32
    with pytest.raises(ServeError, match=API_KEY_VAR):
        load_api_key(ServeSettings(), {})  # loopback too: any local user could reach it


def test_a_taken_port_is_refused() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(ServeError, match="in use"):
            check_port_free("127.0.0.1", holder.getsockname()[1])
