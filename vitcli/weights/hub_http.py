"""The network side of `vit fetch`: timeouts, a progress deadline, size bounds, and every way a
download can fail turned into one sentence.

huggingface_hub's own client waits for ever on a hub that dribbles (one byte every two
seconds passes any read timeout) and retries a timeout with back-off. Here every connection
goes through `_Stream`, which enforces, for headers and body alike:

- connect and read timeouts of VITCLI_HUB_TIMEOUT seconds (default 30);
- a progress deadline: a connection that delivers less than MIN_BYTES (1 KiB) in any window of
  VITCLI_HUB_TIMEOUT seconds is dropped;
- a size bound: a reply whose Content-Length exceeds `max_download_bytes()` is refused before
  a byte of its body is read.

These failures, and every transport error (refused, DNS, a reply that is not HTTP, a proxy
failure), reach huggingface_hub as `HubUnreachable`, which is not an httpx error: its client
gives up at once instead of retrying with back-off for half a minute (hub.download then falls
back to the local cache itself). `cause_of` names the cause of any failure in words.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any

TIMEOUT_ENV = "VITCLI_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
MIN_BYTES = 1024  # per timeout window: less than this is a stalled connection


class HubUnreachable(Exception):
    """A request that failed below HTTP (never retried); its cause is chained."""


class HubStalled(HubUnreachable):
    """A connection that stalled, timed out or declared an impossible size."""


class _Transport:
    """An httpx transport whose transport errors become HubUnreachable (not retried)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def handle_request(self, request):
        import httpx2

        try:
            return self.inner.handle_request(request)
        except httpx2.TransportError as error:
            raise HubUnreachable(cause_of(error)) from error

    def close(self) -> None:
        self.inner.close()

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)


def hub_timeout() -> float:
    """Seconds for a connect, a read and each progress window (VITCLI_HUB_TIMEOUT)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        value = DEFAULT_TIMEOUT
    return min(max(value, 0.1), 86_400.0) if value == value else DEFAULT_TIMEOUT


def max_download_bytes() -> int:
    """The largest file a download may declare: the largest model we build in float32, plus
    room for a pickle's framing (a Content-Length of 10^18 is refused before any body)."""
    from .limits import max_parameters

    return 4 * max_parameters() + (1 << 30)


class _Stream:
    """A network stream that enforces the timeouts and the progress deadline."""

    def __init__(self, inner: Any, limit: float) -> None:
        self.inner = inner
        self.limit = limit
        self.window_start = time.monotonic()
        self.window_bytes = 0

    def _remaining(self) -> float:
        now = time.monotonic()
        if now - self.window_start >= self.limit:
            if self.window_bytes < MIN_BYTES:
                raise HubStalled(
                    f"the hub sent {self.window_bytes} bytes in {self.limit:g} s "
                    f"(less than {MIN_BYTES} bytes in {TIMEOUT_ENV}={self.limit:g} s)"
                )
            self.window_start, self.window_bytes = now, 0
        return max(0.01, self.window_start + self.limit - now)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        import httpcore2

        wait = self._remaining()
        try:
            data = self.inner.read(max_bytes, wait if timeout is None else min(timeout, wait))
        except httpcore2.ReadTimeout:
            self._remaining()  # the window is over: say how little came
            raise HubStalled(f"no reply within {self.limit:g} s ({TIMEOUT_ENV})") from None
        self.window_bytes += len(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        import httpcore2

        # A request starts a new exchange: a kept-alive connection that sat idle between two
        # requests has not stalled.
        self.window_start, self.window_bytes = time.monotonic(), 0
        try:
            self.inner.write(buffer, self.limit if timeout is None else min(timeout, self.limit))
        except httpcore2.WriteTimeout:
            raise HubStalled(f"sending the request took over {self.limit:g} s") from None

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> _Stream:
        tls = self.inner.start_tls(ssl_context, server_hostname, timeout)
        return _Stream(tls, self.limit)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _Backend:
    """httpcore's synchronous network backend with every stream wrapped in `_Stream`."""

    def __init__(self, limit: float) -> None:
        import httpcore2

        self.inner = httpcore2.SyncBackend()
        self.limit = limit

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        import httpcore2

        wait = self.limit if timeout is None else min(timeout, self.limit)
        try:
            stream = self.inner.connect_tcp(host, port, wait, local_address, socket_options)
        except httpcore2.ConnectTimeout:
            raise HubStalled(f"connecting to {host} took over {self.limit:g} s") from None
        return _Stream(stream, self.limit)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _Stream(self.inner.connect_unix_socket(path, timeout, socket_options), self.limit)

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def _refuse_huge(response) -> None:
    declared = response.headers.get("content-length")
    if declared is None:
        return
    limit = max_download_bytes()
    if not declared.strip().isdigit() or len(declared.strip()) > 20 or int(declared) > limit:
        raise HubStalled(
            f"the hub declared a file of {declared.strip()[:24]} bytes, over the "
            f"{limit / 2**30:.0f} GiB a model file may have (VITCLI_MAX_PARAMETERS raises it)"
        )


def client_factory():
    """huggingface_hub's client (its request hook, redirects followed) on our backend, with
    connect/read timeouts, the progress deadline and the size bound; proxies from the
    environment as usual."""
    import httpx2
    from huggingface_hub.utils._http import hf_request_event_hook

    limit = hub_timeout()
    client = httpx2.Client(
        event_hooks={"request": [hf_request_event_hook], "response": [_refuse_huge]},
        follow_redirects=True,
        max_redirects=10,
        timeout=httpx2.Timeout(limit),
    )
    # httpx builds one transport, plus one per proxy from the environment: each gets our
    # backend and our error mapping (private attributes: tests/test_hostile_hub.py holds them).
    inside: Any = client
    mounts: dict = inside._mounts
    for transport in [inside._transport, *mounts.values()]:
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_network_backend"):
            pool._network_backend = _Backend(limit)
    inside._transport = _Transport(inside._transport)
    for pattern, transport in list(mounts.items()):
        if transport is not None:
            mounts[pattern] = _Transport(transport)
    return client


def install() -> None:
    """Make huggingface_hub use `client_factory` (idempotent; read the timeout again)."""
    from huggingface_hub import set_client_factory

    set_client_factory(client_factory)


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen and len(seen) < 20:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def cause_of(error: BaseException) -> str:
    """The cause of a failed hub request in words: refused, timed out, DNS, an HTTP status,
    a proxy, a redirect loop, a reply that is not HTTP or not what a hub sends, a cut-short
    file, a SOCKS proxy without socksio."""
    import httpx2

    chain = _chain(error)
    for item in chain:
        if isinstance(item, HubUnreachable):
            return str(item)
        if isinstance(item, ImportError) and "socksio" in str(item):
            return (
                "a SOCKS proxy is set but the socksio package is missing "
                "(pip install socksio, or unset ALL_PROXY/HTTPS_PROXY)"
            )
    for item in chain:
        if isinstance(item, httpx2.ProxyError) or (
            isinstance(item, httpx2.ConnectError) and _proxy() and "refused" in str(item)
        ):
            return f"the proxy {_proxy()} failed ({_first_line(item)})"
        if isinstance(item, httpx2.TooManyRedirects):
            return "the hub redirected too many times (a redirect loop)"
        if isinstance(item, httpx2.TimeoutException):
            return "the connection timed out"
        if isinstance(item, socket.gaierror):
            return "the host name could not be resolved (DNS)"
        if isinstance(item, ConnectionRefusedError) or (
            isinstance(item, OSError) and item.errno == errno.ECONNREFUSED
        ):
            return "the connection was refused"
        response = getattr(item, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return f"the hub answered HTTP {status}"
        if isinstance(item, httpx2.RemoteProtocolError):
            text = _first_line(item)
            if "without sending complete message body" in text:
                return f"the reply was cut short ({text.rpartition('(')[2].rstrip(')')})"
            return "the reply was not HTTP (is HF_ENDPOINT a web server?)"
        if isinstance(item, httpx2.ConnectError):
            text = _first_line(item).lower()
            if "name or service" in text or "resolution" in text or "nodename" in text:
                return "the host name could not be resolved (DNS)"
            if "refused" in text:
                return "the connection was refused"
            return f"cannot connect ({_first_line(item)})"
        if isinstance(item, (httpx2.ReadError, httpx2.WriteError)):
            return f"the connection broke ({_first_line(item)})"
        if isinstance(item, ValueError) and not isinstance(item, UnicodeError):
            return "the hub's reply is not what a hub sends (not the JSON expected)"
        if isinstance(item, OSError) and "consistency check failed" in str(item).lower():
            return "a file arrived shorter or longer than the hub declared (cut short)"
    return _first_line(error)


def _proxy() -> str:
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        if os.environ.get(name):
            return os.environ[name]
    return ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0][:200] if text else "") or type(error).__name__
