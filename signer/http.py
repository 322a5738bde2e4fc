"""A minimal HTTP/1.1 server for the public TUF repository at ``/tuf/``.

TUF metadata is signed and public, so no client certificate is asked for; TLS (the signer's
server certificate) only keeps the transport private. The server answers ``GET`` and ``HEAD``
for repository file names and nothing else, one request per connection, with bounded request
size, read time, response size and concurrency, so a slow or hostile client costs little.

Other read-only pages (the operator dashboard, ``signer/dashboard.py``) plug in as ``routes``:
a path prefix and an async handler that gets the parsed request (headers, and a small form body
for ``POST``) and returns the whole response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kms.errors import KmsError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8 * 1024
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
MAX_FORM_BYTES = 4 * 1024  # a route's POST body (a login form), read only for routes
PATH_PREFIX = "/tuf/"

FileReader = Callable[[str], Awaitable[bytes | None]]
_REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized",
            404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
            415: "Unsupported Media Type", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(frozen=True)
class HttpRequest:
    """One parsed request for a route: ``target`` is the path with its query; header names are
    lower case (a repeated header keeps its last value)."""

    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[str, ...] = field(default=())


RouteHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]


@dataclass
class TufHttpServer:
    server: asyncio.Server
    port: int

    async def stop(self) -> None:
        self.server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self.server.wait_closed()


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Server-side TLS with the signer's certificate; clients are not asked for one."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


async def start_tuf_http(listen: str, read_file: FileReader,
                         tls: ssl.SSLContext | None,
                         routes: Mapping[str, RouteHandler] | None = None) -> TufHttpServer:
    """Serve ``read_file(name)`` at ``/tuf/<name>`` on ``listen`` (host:port, port 0 picks one),
    and hand requests whose path is a ``routes`` prefix (or starts with prefix + ``/``) to its
    handler.

    ``read_file`` returns None for a missing file and may raise ``KmsError`` (503); a handler
    may raise ``KmsError`` too (503).
    """
    routes = dict(routes or {})
    host, _, port = listen.rpartition(":")
    slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if slots.locked():
            writer.close()  # over capacity: refuse at once rather than queue
            return
        async with slots:
            try:
                await _serve_one(reader, writer, read_file, routes)
            except (ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
                pass  # the client went away or was too slow; nothing to answer
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await writer.wait_closed()

    # reuse_port: worker processes of one signer (docs/adr/0008) share the /tuf/ port as they
    # share the gRPC one; the kernel spreads connections between them.
    server = await asyncio.start_server(handle, host or "127.0.0.1", int(port), ssl=tls,
                                        limit=MAX_REQUEST_BYTES, reuse_port=True,
                                        ssl_handshake_timeout=READ_TIMEOUT)
    bound = server.sockets[0].getsockname()[1]
    return TufHttpServer(server, int(bound))


async def _serve_one(  # noqa: PLR0911 - one early answer per way a request can be wrong
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    read_file: FileReader, routes: Mapping[str, RouteHandler]) -> None:
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        await _respond(writer, 413, b"request too large\n")
        return
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        await _respond(writer, 400, b"bad request line\n")
        return
    method, target, _ = parts
    path = target.split("?", 1)[0]
    handler = next((h for prefix, h in routes.items()
                    if path == prefix or path.startswith(prefix + "/")), None)
    if handler is not None:
        await _serve_route(reader, writer, handler, method=method, target=target,
                           header_lines=lines[1:])
        return
    if method not in ("GET", "HEAD"):
        await _respond(writer, 405, b"only GET and HEAD\n", extra=("Allow: GET, HEAD",))
        return
    if not path.startswith(PATH_PREFIX):
        await _respond(writer, 404, b"not found; the TUF repository is at /tuf/\n")
        return
    name = path[len(PATH_PREFIX):]
    try:
        body = await read_file(name)
    except KmsError as error:
        log.warning("TUF file %s unavailable: %s", name, error.diagnostics())
        await _respond(writer, 503, b"repository unavailable; retry\n")
        return
    if body is None:
        await _respond(writer, 404, b"no such repository file\n")
        return
    if len(body) > MAX_RESPONSE_BYTES:
        log.error("TUF file %s is %d bytes, over the %d byte cap", name, len(body),
                  MAX_RESPONSE_BYTES)
        await _respond(writer, 500, b"repository file too large\n")
        return
    content_type = "application/json"
    await _respond(writer, 200, body, content_type=content_type, head_only=method == "HEAD",
                   extra=("Cache-Control: no-cache" if name == "timestamp.json"
                          else "Cache-Control: public, max-age=300, immutable",))


async def _serve_route(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: RouteHandler, *,
    method: str, target: str, header_lines: list[str]) -> None:
    """Answer one request with ``handler``. Only GET, HEAD and a small POST body are accepted;
    the target is never logged, since a query may carry a credential."""
    if method not in ("GET", "HEAD", "POST"):
        await _respond(writer, 405, b"only GET, HEAD and POST\n",
                       extra=("Allow: GET, HEAD, POST",))
        return
    headers = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = b""
    if method == "POST":
        length = headers.get("content-length", "")
        if not length.isdigit():
            await _respond(writer, 400, b"POST needs a Content-Length\n")
            return
        if int(length) > MAX_FORM_BYTES:
            await _respond(writer, 413, b"form too large\n")
            return
        async with asyncio.timeout(READ_TIMEOUT):
            body = await reader.readexactly(int(length))
    try:
        response = await handler(HttpRequest(method, target, headers, body))
    except KmsError as error:
        log.warning("%s unavailable: %s", target.split("?", 1)[0], error.diagnostics())
        await _respond(writer, 503, b"unavailable; retry\n")
        return
    if len(response.body) > MAX_RESPONSE_BYTES:
        log.error("response for %s is %d bytes, over the %d byte cap",
                  target.split("?", 1)[0], len(response.body), MAX_RESPONSE_BYTES)
        await _respond(writer, 500, b"response too large\n")
        return
    await _respond(writer, response.status, response.body,
                   content_type=response.content_type, head_only=method == "HEAD",
                   extra=response.headers)


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, *,
                   content_type: str = "text/plain; charset=utf-8", head_only: bool = False,
                   extra: tuple[str, ...] = ()) -> None:
    headers = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
               f"Content-Length: {len(body)}", "Connection: close", *extra, "", ""]
    writer.write("\r\n".join(headers).encode("latin-1"))
    if not head_only:
        writer.write(body)
    async with asyncio.timeout(WRITE_TIMEOUT):
        await writer.drain()
