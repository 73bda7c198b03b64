"""A loopback stand-in for the Hugging Face hub that misbehaves on request (tests only).

`HostileHub(mode)` serves one repo, org/tiny, holding config.json; `mode` picks the fault:
ok, dribble (one byte every `pause` seconds, API reply included), dribble-file (only the file
dribbles), garbage (a reply that is not HTTP), not-json (HTTP 200 with a body that is not
JSON), redirect-loop, huge (a file declaring 10^18 bytes), truncated (a file cut short),
status-500, status-404.
"""

from __future__ import annotations

import json
import socket
import threading
import time

SHA = "0123456789abcdef0123456789abcdef01234567"
CONFIG = json.dumps({"model_type": "vit"}).encode()


class HostileHub:
    def __init__(self, mode: str, pause: float = 2.0) -> None:
        self.mode = mode
        self.pause = pause
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        self.server.close()

    def __enter__(self) -> HostileHub:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            with connection:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    request += chunk
                method, path = request.split(b" ")[:2]
                self._answer(connection, method.decode(), path.decode())
        except OSError:
            pass

    def _send(self, connection, status: str, headers: dict, body: bytes, dribble: bool) -> None:
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        data = (head + "Connection: close\r\n\r\n").encode() + body
        if not dribble:
            connection.sendall(data)
            return
        for byte in data:
            if self.stopped.is_set():
                return
            connection.sendall(bytes([byte]))
            time.sleep(self.pause)

    def _answer(self, connection, method: str, path: str) -> None:
        mode = self.mode
        if mode == "garbage":
            connection.sendall(b"SSH-2.0-OpenSSH_9.6 not a web server\r\n\r\n")
            return
        if mode.startswith("status-"):
            self._send(connection, f"{mode[7:]} Oops", {"Content-Length": "0"}, b"", False)
            return
        if mode == "redirect-loop":
            headers = {"Location": path, "Content-Length": "0"}
            self._send(connection, "302 Found", headers, b"", False)
            return
        if path.startswith("/api/models/"):
            if mode == "not-json":
                body = b"<html>welcome to the captive portal</html>"
            elif "/tree/" in path:
                size = 10**18 if mode == "huge" else len(CONFIG)
                body = json.dumps(
                    [{"type": "file", "oid": "cafe", "size": size, "path": "config.json"}]
                ).encode()
            else:
                body = json.dumps(
                    {"id": "org/tiny", "sha": SHA, "siblings": [{"rfilename": "config.json"}]}
                ).encode()
            headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
            self._send(connection, "200 OK", headers, body, mode == "dribble")
            return
        body = CONFIG
        length = str(len(body))
        if mode == "huge":
            length = str(10**18)
        if mode == "truncated":
            length, body = str(len(body) + 1000), body
        headers = {
            "Content-Length": length,
            "ETag": '"cafe"',
            "X-Repo-Commit": SHA,
            "Content-Type": "application/json",
        }
        self._send(
            connection,
            "200 OK",
            headers,
            b"" if method == "HEAD" else body,
            mode in ("dribble", "dribble-file") and method == "GET",
        )
