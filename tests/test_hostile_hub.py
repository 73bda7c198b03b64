"""`vit fetch` against a hub that misbehaves, served for real on loopback (tests/hub_server.py):
connect and read timeouts, a progress deadline (VITCLI_HUB_TIMEOUT keeps these short), size
bounds, and every failure in one line naming its cause, with no `.incomplete` file left."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from hub_server import HostileHub

from vitcli.weights import hub_http

VIT = [sys.executable, "-m", "vitcli"]


@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setenv(hub_http.TIMEOUT_ENV, "1")


def get(url: str) -> httpx2.Response:
    with hub_http.client_factory() as client:
        return client.get(url)


def test_a_dribbling_reply_is_dropped_after_the_deadline(short_timeout):
    with HostileHub("dribble", pause=0.3) as hub:
        started = time.monotonic()
        with pytest.raises(hub_http.HubUnreachable, match="less than 1024 bytes"):
            get(hub.url + "/api/models/org/tiny/revision/main")
        assert time.monotonic() - started < 20  # not the minutes the whole reply would take


def test_a_silent_server_is_dropped_after_the_read_timeout(short_timeout):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts (the kernel does) and never answers
    try:
        with pytest.raises(hub_http.HubUnreachable, match=r"within 1 s|less than"):
            get(f"http://127.0.0.1:{server.getsockname()[1]}/api/models/org/tiny")
    finally:
        server.close()


@pytest.mark.parametrize(
    "mode,cause",
    [
        ("garbage", "not HTTP"),
        ("redirect-loop", "redirect loop"),
        ("huge", "declared a file of 1000000000000000000 bytes"),
        ("truncated", "cut short"),
    ],
)
def test_each_fault_is_named(short_timeout, mode, cause):
    with HostileHub(mode) as hub, pytest.raises(Exception) as caught:
        response = get(hub.url + "/org/tiny/resolve/main/config.json")
        response.raise_for_status()
    assert cause in hub_http.cause_of(caught.value)


def test_refused_dns_proxy_and_status_are_named(monkeypatch):
    refused = httpx2.ConnectError("[Errno 111] Connection refused")
    assert hub_http.cause_of(refused) == "the connection was refused"
    dns = httpx2.ConnectError("[Errno -2] Name or service not known")
    assert "(DNS)" in hub_http.cause_of(dns)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
    assert "proxy http://127.0.0.1:1 failed" in hub_http.cause_of(refused)
    response = httpx2.Response(503, request=httpx2.Request("GET", "http://hub"))
    status = httpx2.HTTPStatusError("503", request=response.request, response=response)
    assert hub_http.cause_of(status) == "the hub answered HTTP 503"
    socks = ImportError("Using SOCKS proxy, but the 'socksio' package is not installed.")
    assert "pip install socksio" in hub_http.cause_of(socks)


def test_the_timeout_is_read_from_the_environment(monkeypatch):
    for text, expected in (("2.5", 2.5), ("", 30.0), ("junk", 30.0), ("nan", 30.0), ("0", 0.1)):
        monkeypatch.setenv(hub_http.TIMEOUT_ENV, text)
        assert hub_http.hub_timeout() == expected


def fetch(tmp_path: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf"),
        hub_http.TIMEOUT_ENV: "2",
        **env,
    }
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        environment.pop(name, None)
    return subprocess.run(
        [*VIT, "fetch", "org/tiny"], env=environment, capture_output=True, timeout=120
    )


def one_line(result: subprocess.CompletedProcess, cause: str) -> None:
    lines = result.stderr.decode().strip().splitlines()
    lines = [line for line in lines if not line.startswith("Fetching")]  # the hub's bar
    assert result.returncode == 1, result.stderr.decode()
    assert len(lines) == 1 and lines[0].startswith("error: org/tiny"), lines
    assert cause in lines[0], lines[0]


def no_partial_files(tmp_path: Path) -> None:
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.name.endswith(".incomplete")]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,cause",
    [
        ("dribble", "less than 1024 bytes"),
        ("dribble-file", "less than 1024 bytes"),
        ("garbage", "not HTTP"),
        ("not-json", "not what a hub sends"),
        ("redirect-loop", "redirect loop"),
        ("huge", "over the"),
        ("truncated", "cut short"),
        ("status-404", "HTTP 404"),
    ],
)
def test_vit_fetch_from_a_hostile_hub_ends_in_one_line(tmp_path, mode, cause):
    with HostileHub(mode) as hub:
        one_line(fetch(tmp_path, hub.url), cause)
    no_partial_files(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "endpoint,env,cause",
    [
        ("http://127.0.0.1:1", {}, "the connection was refused"),
        ("http://nonexistent.invalid", {}, "(DNS)"),
        ("http://example.org", {"ALL_PROXY": "socks5://127.0.0.1:1"}, "socksio"),
        (
            "http://example.org",
            {"HTTP_PROXY": "http://127.0.0.1:1", "HTTPS_PROXY": "http://127.0.0.1:1"},
            "the proxy http://127.0.0.1:1 failed",
        ),
    ],
)
def test_vit_fetch_without_a_hub_names_the_cause(tmp_path, endpoint, env, cause):
    if cause == "socksio":
        try:
            import socksio  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("socksio is installed: a SOCKS proxy works here")
    one_line(fetch(tmp_path, endpoint, **env), cause)


@pytest.mark.slow
def test_a_cached_model_still_loads_when_the_hub_is_unreachable(tmp_path):
    from checkpoints import populate_hub_cache

    snapshot = populate_hub_cache(
        tmp_path / "hf" / "hub",
        "org/tiny",
        {"config.json": b'{"model_type": "vit"}', "model.safetensors": b"weights"},
    )
    result = fetch(tmp_path, "http://127.0.0.1:1")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == str(snapshot)


def test_an_idle_kept_alive_connection_is_not_a_stall(monkeypatch):
    monkeypatch.setenv(hub_http.TIMEOUT_ENV, "0.5")

    class Quiet:
        def read(self, max_bytes, timeout=None):
            return b"x" * 10

        def write(self, buffer, timeout=None):
            pass

    stream = hub_http._Stream(Quiet(), 0.5)
    stream.read(10)
    stream.window_start -= 5  # idle for 5 s after a small reply
    stream.write(b"GET / HTTP/1.1\r\n\r\n")  # the next request on the same connection
    assert stream.read(10) == b"x" * 10
    stream.window_start -= 5  # but a reply that then trickles is dropped
    with pytest.raises(hub_http.HubStalled):
        stream.read(10)
