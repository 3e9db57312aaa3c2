"""HTTP/1.1 over a plain socket, for clients that leave at a chosen byte."""

from __future__ import annotations

import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit


def request_bytes(
    base_url: str, path: str, body: dict[str, Any], key: str, *, close: bool = False
) -> bytes:
    """A complete POST of ``body`` as JSON, with ``key`` as the bearer token.

    With ``close`` the server is asked to close the connection after its answer (so the
    answer ends where the bytes do).
    """
    host = urlsplit(base_url).netloc
    payload = json.dumps(body).encode()
    connection = "connection: close\r\n" if close else ""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key}\r\n{connection}content-length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def connect(base_url: str) -> socket.socket:
    parts = urlsplit(base_url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_then_close(
    base_url: str, path: str, body: dict[str, Any], key: str, after_s: float
) -> None:
    """Send the request, wait ``after_s``, close without reading a byte."""
    sock = connect(base_url)
    try:
        sock.sendall(request_bytes(base_url, path, body, key))
        if after_s:
            time.sleep(after_s)
    finally:
        sock.close()


def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    """Read until ``marker`` has arrived (or the peer closed); what was read."""
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def close_after(base_url: str, path: str, body: dict[str, Any], key: str, marker: bytes) -> bytes:
    """Send the request, read until ``marker`` arrives, then close; what was read."""
    sock = connect(base_url)
    try:
        sock.sendall(request_bytes(base_url, path, body, key))
        return read_until(sock, marker)
    finally:
        sock.close()


def read_all(sock: socket.socket, limit: int = 16 << 20) -> bytes:
    """Read until the peer closes."""
    data = b""
    while len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def head_of(data: bytes) -> tuple[int | None, dict[str, str]]:
    """The status code and the headers of a raw answer (``None`` before they arrived)."""
    head, found, _ = data.partition(b"\r\n\r\n")
    if not found:
        return None, {}
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers
