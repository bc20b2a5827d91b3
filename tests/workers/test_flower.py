"""Flower: authentication from settings, and only ids in what it shows."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import click
import httpx
import pytest

from chartsum.cli_ops import flower_arguments
from schemas.settings import Settings
from tests.conftest import REPO

pytestmark = pytest.mark.services


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_flower_refuses_to_listen_beyond_localhost_without_auth() -> None:
    """0.0.0.0 without basic auth is refused with what to set."""
    settings = Settings.model_validate({"operations": {"flower_address": "0.0.0.0"}})

    with pytest.raises(click.UsageError, match="FLOWER_BASIC_AUTH"):
        flower_arguments(settings)


def test_flower_may_listen_on_loopback_without_auth_but_uses_it_when_set() -> None:
    """Loopback needs no auth; configured auth is always passed on."""
    plain = flower_arguments(Settings())
    secured = flower_arguments(
        Settings.model_validate(
            {"operations": {"flower_address": "0.0.0.0", "flower_basic_auth": "a:b"}}
        )
    )

    assert not any(arg.startswith("--basic-auth") for arg in plain)
    assert "--basic-auth=a:b" in secured


def test_a_running_flower_demands_the_configured_password(redis_url: str) -> None:
    """Without credentials Flower answers 401; with them, 200."""
    port = _free_port()
    env = dict(os.environ)
    env.update(
        {
            "CHARTSUM_REDIS__URL": redis_url,
            "CHARTSUM_OPERATIONS__FLOWER_PORT": str(port),
            "CHARTSUM_OPERATIONS__FLOWER_BASIC_AUTH": "operator:s3cret",
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "chartsum", "flower"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/workers"
        deadline = time.monotonic() + 60
        while True:
            try:
                anonymous = httpx.get(url, timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail("Flower did not start within 60 s")
                time.sleep(0.5)
        authorized = httpx.get(url, auth=("operator", "s3cret"), timeout=10)
        wrong = httpx.get(url, auth=("operator", "nope"), timeout=10)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)

    assert anonymous.status_code == 401
    assert wrong.status_code == 401
    assert authorized.status_code == 200
