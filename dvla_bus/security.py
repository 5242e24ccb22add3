"""CURVE authentication and encryption for connections that leave the host.

A deployment has one key directory (made by ``dvla keys new DIR --host h0 --host h1 ...`` and
copied to every host, like a cluster secret):

* ``server.key`` / ``server.key_secret`` — the key pair every *server* socket (control hub,
  data inboxes, taps) presents;
* ``<host>.key`` / ``<host>.key_secret`` — one client key pair per host, which that host's
  nodes present when they connect.

Files are ZeroMQ certificates (``zmq.auth`` format, Z85 keys); secret files are written 0600 and
refused when other users can read them. A server admits exactly the client public keys found in
the directory (``*.key`` except ``server.key``): the ZAP handler (:func:`open_zap`, one per
ZeroMQ context, running on the event loop) answers every CURVE handshake and counts what it
accepts and refuses. A refused peer's handshake fails, so nothing it sends reaches a node.

``ipc://`` endpoints are never encrypted (same host, socket files 0600); ``tcp://`` endpoints
are when credentials are configured. CURVE costs ~4x throughput on these cores (MEASURED.md);
the topology's ``[data] encrypt`` chooses for the data bus, the control bus is always encrypted
across hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.asyncio
import zmq.auth

from dvla_bus.errors import ConfigError

__all__ = [
    "Credentials",
    "ZapHandler",
    "client_options",
    "generate_keys",
    "load_credentials",
    "open_zap",
    "server_options",
    "zap_statistics",
]

log = logging.getLogger(__name__)

ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"
SERVER: Final = "server"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a node needs: the server pair (to serve) and its host's client pair (to connect),
    plus the client public keys a server admits. Keys are Z85 ``bytes``."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes
    allowed: frozenset[bytes]
    directory: str

    def __repr__(self) -> str:  # never print secrets
        return f"Credentials(directory={self.directory!r}, allowed={len(self.allowed)} keys)"


def generate_keys(directory: Path, hosts: Iterable[str], *, overwrite: bool = False) -> list[Path]:
    """Create the server pair (unless present) and one client pair per host in ``directory``
    (mode 0700). Returns the files written. Existing host pairs are kept unless ``overwrite``."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    written: list[Path] = []
    for name in (SERVER, *hosts):
        public = directory / f"{name}.key"
        if public.exists() and not overwrite:
            continue
        for stale in (public, directory / f"{name}.key_secret"):
            stale.unlink(missing_ok=True)
        pub, sec = zmq.auth.create_certificates(str(directory), name)
        os.chmod(sec, 0o600)
        os.chmod(pub, 0o644)
        written += [Path(pub), Path(sec)]
    return written


def _load_pair(directory: Path, name: str) -> tuple[bytes, bytes]:
    secret_file = directory / f"{name}.key_secret"
    if not secret_file.exists():
        raise ConfigError(
            f"{secret_file}: missing; create keys with `dvla keys new {directory} --host {name}`"
        )
    mode = secret_file.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{secret_file}: readable by other users (mode {stat.filemode(mode)}); chmod 600 it"
        )
    public, secret = zmq.auth.load_certificate(str(secret_file))
    if secret is None:
        raise ConfigError(f"{secret_file}: holds no secret key")
    return public, secret


def load_credentials(directory: str | Path, host: str) -> Credentials:
    """Load the key directory for a node on ``host``; :class:`ConfigError` names what is
    missing or unsafe."""
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError(f"{path}: key directory not found (dvla keys new {path} --host ...)")
    server_public, server_secret = _load_pair(path, SERVER)
    client_public, client_secret = _load_pair(path, host)
    allowed = set()
    for public_file in sorted(path.glob("*.key")):
        if public_file.stem == SERVER:
            continue
        key, _ = zmq.auth.load_certificate(str(public_file))
        allowed.add(key)
    return Credentials(
        server_public=server_public,
        server_secret=server_secret,
        client_public=client_public,
        client_secret=client_secret,
        allowed=frozenset(allowed),
        directory=str(path),
    )


def server_options(creds: Credentials) -> dict[int, Any]:
    """Socket options that make a bound socket a CURVE server (ZAP domain ``dvla``)."""
    return {
        zmq.CURVE_SERVER: 1,
        zmq.CURVE_SECRETKEY: creds.server_secret,
        zmq.CURVE_PUBLICKEY: creds.server_public,
        zmq.ZAP_DOMAIN: b"dvla",
    }


def client_options(creds: Credentials) -> dict[int, Any]:
    """Socket options that make a connecting socket a CURVE client of our servers."""
    return {
        zmq.CURVE_SERVERKEY: creds.server_public,
        zmq.CURVE_PUBLICKEY: creds.client_public,
        zmq.CURVE_SECRETKEY: creds.client_secret,
    }


class ZapHandler:
    """Answers ZAP requests for one context: CURVE clients whose public key is in ``allowed``
    are admitted; everything else (unknown key, another mechanism) is refused and counted."""

    def __init__(self, sock: zmq.asyncio.Socket, allowed: frozenset[bytes]) -> None:
        self.sock = sock
        self.allowed = {zmq.utils.z85.decode(k) for k in allowed}
        self.counts: Counter[str] = Counter()

    async def serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) < 6:
                self.counts["malformed"] += 1
                continue
            version, request_id, _domain, address, _identity, mechanism = frames[:6]
            credentials = frames[6:]
            ok = mechanism == b"CURVE" and bool(credentials) and credentials[0] in self.allowed
            if ok:
                self.counts["accepted"] += 1
                reply = [version, request_id, b"200", b"OK", b"dvla", b""]
            else:
                self.counts["refused"] += 1
                log.warning(
                    "refused a %s handshake from %s: key not in the deployment's list",
                    mechanism.decode(errors="replace"),
                    address.decode(errors="replace"),
                )
                reply = [version, request_id, b"400", b"not authorised", b"", b""]
            await self.sock.send_multipart(reply)


@contextlib.asynccontextmanager
async def open_zap(
    ctx: zmq.asyncio.Context, creds: Credentials | None
) -> AsyncIterator[ZapHandler | None]:
    """Serve ZAP for ``ctx`` while the block runs (nothing when ``creds`` is None). Must be
    entered before any CURVE server socket on ``ctx`` binds."""
    if creds is None:
        yield None
        return
    sock = ctx.socket(zmq.REP)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(ZAP_ENDPOINT)
        handler = ZapHandler(sock, creds.allowed)
        _handlers[ctx] = handler
        task = asyncio.create_task(handler.serve())
        try:
            yield handler
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            _handlers.pop(ctx, None)
    finally:
        sock.close(linger=0)


_handlers: weakref.WeakKeyDictionary[Any, ZapHandler] = weakref.WeakKeyDictionary()


def zap_statistics(ctx: Any) -> dict[str, int]:
    """``zap.accepted`` / ``zap.refused`` / ``zap.malformed`` of the context's handler."""
    handler = _handlers.get(ctx)
    if handler is None:
        return {}
    return {f"zap.{k}": v for k, v in handler.counts.items()}


def is_remote(endpoint: str) -> bool:
    """Whether an endpoint leaves the host (and so gets CURVE when credentials exist)."""
    return endpoint.startswith("tcp://")
