"""An ASGI app that forwards Flower's Fleet API, and nothing else, to a SuperLink on loopback.

Flower 1.41's SuperLink serves three APIs on one HTTP(S) port: Fleet (``/v1/fleet/*``, what
SuperNodes call, each request signed with the node's registered key), Control
(``/v1/control/*``, what the ``flwr`` CLI calls: submit, list and stop runs, stream logs,
register and unregister node keys; no authentication in the open-source SuperLink) and Runtime
(``/v1/runtime/*``, what its SuperExec calls to acquire ServerApp tasks and their tokens;
unauthenticated in subprocess isolation). Only Fleet may face the clients' network.

:class:`FleetProxy` forwards a request only when its method is ``POST`` and its raw request path
(as sent, before any percent-decoding) is exactly one of :data:`FLEET_PATHS`, the routes of
Flower's Fleet router (``flwr.superlink.routers.fleet.router``), with no query string. Everything
else (Control, Runtime, ``/docs``, ``/health``, other methods, trailing slashes, encoded or
dot segments, case variants) is answered ``403`` by the proxy and never reaches the SuperLink.
Node authentication stays Flower's: the signed ``flwr-*`` headers are passed through unchanged.

Forwarding streams both bodies (nothing is buffered), reuses upstream connections (an
``httpx.AsyncClient`` pool; TLS verified against the fedvault CA), drops hop-by-hop headers
(RFC 9110 section 7.6.1) and every client-sent ``Forwarded`` / ``X-Forwarded-*`` header, then sets
``X-Forwarded-For`` to the real peer: Flower's uvicorn trusts those headers from 127.0.0.1, so a
client could otherwise choose the address the SuperLink logs for it.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FLEET_METHOD = "POST"
#: The Fleet routes of Flower 1.41 (``flower-supernode``'s ``FleetHttpClient``). A test checks
#: this against Flower's router, so an upgrade that adds one fails there, not in a deployment.
FLEET_PATHS = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
#: Not forwarded in either direction: hop-by-hop (RFC 9110 section 7.6.1), the upstream's own
#: ``host``, and ``expect`` (the proxy already read past it).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "expect",
    }
)
#: Client-sent headers that claim a client address or scheme; the proxy sets its own.
FORWARDING = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-port", "x-forwarded-proto"})
UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=120.0, pool=60.0)
UPSTREAM_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=30.0)
REFUSED = (
    "forbidden: this port serves only Flower's Fleet API (SuperNodes); "
    "the Control and Runtime APIs are on the server's loopback interface"
)


class _ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


def allowed(method: str, raw_path: bytes, query_string: bytes) -> bool:
    """True only for ``POST`` on an exact Fleet path without a query string."""
    return method == FLEET_METHOD and not query_string and raw_path.decode("latin-1") in FLEET_PATHS


class FleetProxy:
    """ASGI app: forward allowed Fleet requests to ``upstream`` (``https://127.0.0.1:PORT``),
    answer everything else ``403``.

    ``verify`` checks the upstream's certificate (an SSL context with the fedvault CA), or is
    ``False`` for an insecure (plain HTTP) SuperLink. The upstream connection pool lives between
    the ASGI lifespan's startup and shutdown.
    """

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool, timeout: httpx.Timeout = UPSTREAM_TIMEOUT):
        self.upstream = upstream.rstrip("/")
        self._verify = verify
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # no other scope types: the front runs uvicorn with websockets off

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(
                    verify=self._verify, timeout=self._timeout, limits=UPSTREAM_LIMITS, follow_redirects=False
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
        if not allowed(scope["method"], raw_path, scope.get("query_string", b"")):
            log.info("refused %s %r from %s", scope["method"], raw_path, _peer(scope))
            await _reply(send, 403, REFUSED)
            return
        if self._client is None:
            await _reply(send, 503, "the Fleet proxy is not started")
            return
        request = self._client.build_request(
            scope["method"],
            self.upstream + raw_path.decode("latin-1"),
            headers=upstream_headers(scope),
            content=_request_body(receive),
        )
        try:
            response = await self._client.send(request, stream=True)
        except _ClientGone:
            return
        except httpx.TimeoutException as err:
            log.warning("Fleet proxy: SuperLink at %s timed out on %s: %r", self.upstream, raw_path, err)
            await _reply(send, 504, f"the SuperLink did not answer in time ({type(err).__name__})")
            return
        except httpx.HTTPError as err:
            log.warning("Fleet proxy: SuperLink at %s unreachable for %s: %r", self.upstream, raw_path, err)
            await _reply(send, 502, f"the SuperLink is unreachable ({type(err).__name__})")
            return
        try:
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": _response_headers(response)}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as err:  # the upstream broke off mid-body: the client sees a cut response
            log.warning("Fleet proxy: SuperLink at %s broke off %s: %r", self.upstream, raw_path, err)
        finally:
            await response.aclose()


def upstream_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The client's headers minus hop-by-hop, ``Connection``-listed and forwarding ones, plus
    ``X-Forwarded-For`` (the peer) and ``X-Forwarded-Proto`` (the scheme the client used)."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    listed = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.decode("latin-1").split(",")
    }
    dropped = HOP_BY_HOP | FORWARDING | listed
    kept = [(name, value) for name, value in headers if name.decode("latin-1").lower() not in dropped]
    client = scope.get("client")
    if client:
        kept.append((b"x-forwarded-for", str(client[0]).encode("latin-1")))
    kept.append((b"x-forwarded-proto", str(scope.get("scheme", "http")).encode("latin-1")))
    return kept


def _response_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers minus hop-by-hop and ``Connection``-listed ones."""
    raw = response.headers.raw
    listed = {
        token.strip().lower().encode("latin-1")
        for name, value in raw
        if name.lower() == b"connection"
        for token in value.decode("latin-1").split(",")
    }
    dropped = {name.encode("latin-1") for name in HOP_BY_HOP} | listed
    return [(name.lower(), value) for name, value in raw if name.lower() not in dropped]


async def _request_body(receive: Receive) -> AsyncIterator[bytes]:
    """The client's body as it arrives; raises :class:`_ClientGone` if the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown peer"
