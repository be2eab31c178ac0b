"""The public port of a fedvault SuperLink: TLS with the server certificate, Fleet API only.

:func:`start_fleet_front` binds the public address itself (so a taken port is a clear error in
the caller), then serves :class:`~fedvault.deploy.fleet_proxy.FleetProxy` on it with uvicorn in
a daemon thread of the calling process. Running in-process ties the front's lifetime to the
``fedvault server`` process: if that process dies, even by SIGKILL, nothing keeps answering on
the public port. Uvicorn runs with websockets off, no access log, no ``Server``/``Date`` headers
of its own (the SuperLink's are forwarded) and without trusting ``X-Forwarded-*`` from peers
(it is the edge: the peer address is the client's).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from fedvault.deploy.fleet_proxy import FleetProxy
from fedvault.deploy.processes import join_host_port
from fedvault.errors import FedvaultError

GRACEFUL_SHUTDOWN_S = 5.0
_ANY_HOST = {"", "0.0.0.0"}


class FleetFrontError(FedvaultError, RuntimeError):
    """The public Fleet front could not listen or did not start."""


@dataclass
class FleetFront:
    """A running front started by :func:`start_fleet_front`."""

    address: str  # host:port it listens on
    upstream: str  # the SuperLink's loopback URL it forwards to
    server: uvicorn.Server
    thread: threading.Thread

    def alive(self) -> bool:
        """True while the front is serving."""
        return self.thread.is_alive() and not self.server.should_exit

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to a few seconds), close the pool."""
        self.server.should_exit = True
        self.thread.join(timeout)


def start_fleet_front(
    host: str,
    port: int,
    upstream: str,
    *,
    certfile: Path | None,
    keyfile: Path | None,
    upstream_ca: Path | None,
    timeout: float = 30.0,
) -> FleetFront:
    """Listen on ``host:port`` and forward Fleet requests to ``upstream``.

    With ``certfile``/``keyfile`` the front speaks TLS and ``upstream_ca`` verifies the
    SuperLink's certificate (``upstream`` is ``https://127.0.0.1:PORT``); with all three None it
    is plain HTTP on both sides (an insecure SuperLink). Raises :class:`FleetFrontError` if the
    address cannot be bound or the server does not start within ``timeout`` seconds.
    """
    if (certfile is None) != (keyfile is None) or (certfile is None) != (upstream_ca is None):
        raise FleetFrontError("the Fleet front needs certfile, keyfile and upstream_ca together (or none of them)")
    verify: ssl.SSLContext | bool = False
    if upstream_ca is not None:
        verify = ssl.create_default_context(cafile=str(upstream_ca))
    address = join_host_port(host or "0.0.0.0", port)
    listener = _bind(host, port, address)
    config = uvicorn.Config(
        FleetProxy(upstream, verify),
        ssl_certfile=None if certfile is None else str(certfile),
        ssl_keyfile=None if keyfile is None else str(keyfile),
        lifespan="on",
        ws="none",
        access_log=False,
        log_config=None,
        log_level="warning",
        server_header=False,
        date_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S),
    )
    try:
        config.load()  # TLS files are read here, so a bad certificate fails in the caller
    except (OSError, ssl.SSLError) as err:
        listener.close()
        raise FleetFrontError(f"cannot load the TLS certificate for the Fleet front on {address}: {err}") from err
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="fleet-front", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(GRACEFUL_SHUTDOWN_S)
            listener.close()
            why = "stopped while starting" if not thread.is_alive() else f"did not start within {timeout:g} s"
            raise FleetFrontError(f"the Fleet front on {address} {why}")
        time.sleep(0.05)
    return FleetFront(address, upstream, server, thread)


def _bind(host: str, port: int, address: str) -> socket.socket:
    """A listening socket on ``host:port`` (``::`` also takes IPv4 where the OS allows)."""
    try:
        if host == "::":
            return socket.create_server(
                ("::", port), family=socket.AF_INET6, dualstack_ipv6=socket.has_dualstack_ipv6(), backlog=2048
            )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server(("0.0.0.0" if host in _ANY_HOST else host, port), family=family, backlog=2048)
    except OSError as err:
        raise FleetFrontError(f"cannot listen on {address} for SuperNodes: {err.strerror or err}") from err
