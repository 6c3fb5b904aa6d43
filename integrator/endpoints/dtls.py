"""CoAP over DTLS 1.2 with PSK (:5684), as 1NCE devices expect it (spec section 1.5).

The peer at a source IP must present that SIM's identity (ICCID) and key (`PskLookup`);
anything else gets no session. The DTLS library sits behind `DtlsBackend` (sans-I/O; the
python-mbedtls one is `integrator.endpoints.dtls_mbedtls`). The application on top (the
CoAP handler) sees a `DtlsTransport`: plaintext in `datagram_received`, plaintext out
through `sendto`, and `identity(addr)` for the authenticated PSK identity.

Defences: a ClientHello without a valid cookie gets a HelloVerifyRequest and leaves no
per-peer state; a PSK lookup runs before any reply (unknown IPs hear nothing); new
handshakes are admitted only after the cookie, per source IP by a token bucket and
globally by a cap on concurrent handshakes; sessions are bounded (least recently active
evicted first), idle sessions and stalled handshakes are dropped on the injectable clock.
Nothing a peer sends can raise out of `datagram_received`. Key material is never logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from integrator.endpoints.datagram import BindUdp, DatagramServer, bind_udp
from simwire.clock import Clock
from simwire.logs import RateLimitedLogger
from simwire.metrics import Metrics

log = logging.getLogger("simwire.integrator.dtls")

Addr = tuple[str, int]
T = TypeVar("T")
MAX_DATAGRAM = 16 * 1024
"""Larger datagrams are dropped unread (a DTLS record is at most 2^14 + 2048 bytes; CoAP
over DTLS stays well below the path MTU)."""


class DtlsError(Exception):
    """The association is unusable (fatal alert, wrong PSK, bad handshake): drop it.
    `str()` is safe to log (never contains key material)."""


class DtlsClosed(DtlsError):
    """The peer sent close_notify."""


class DtlsSession(Protocol):
    """One peer's DTLS association, sans-I/O. Created by `DtlsBackend.hello`, driven only
    by `DtlsEndpoint` on the event loop thread (never concurrently)."""

    @property
    def established(self) -> bool:
        """The handshake has completed (the peer proved it holds the expected PSK)."""
        ...

    @property
    def cipher(self) -> str | None:
        """The negotiated cipher suite's IANA name (e.g. TLS_PSK_WITH_AES_128_CCM_8)."""
        ...

    def receive(self, datagram: bytes) -> list[bytes]:
        """Process one datagram (b"": continue the handshake after `hello`); returns the
        application records it decrypted. Raises DtlsError (DtlsClosed) when the
        association is dead; invalid records are discarded silently."""
        ...

    def send(self, plaintext: bytes) -> None:
        """Encrypt one application record (only once established). Raises DtlsError."""
        ...

    def close(self) -> None:
        """Queue a close_notify alert (best effort, never raises)."""
        ...

    def outgoing(self) -> list[bytes]:
        """Datagrams to send to the peer (drained: each is returned once)."""
        ...


class DtlsBackend(Protocol):
    """A DTLS 1.2 server implementation; called by DtlsEndpoint only."""

    def hello(
        self, peer: bytes, datagram: bytes, identity: str, key: bytes,
    ) -> tuple[list[bytes], DtlsSession | None]:
        """A ClientHello from a peer that has no session, whose IP must use (identity, key).

        `peer` binds the cookie to the transport address. Without a valid cookie:
        `([HelloVerifyRequest], None)` and nothing is kept. With one: `([], session)`,
        the ClientHello consumed and nothing sent yet (the caller admits the session, then
        calls `session.receive(b"")` for the server's flight, or drops it). Anything else:
        `([], None)`. Never raises for bad input."""
        ...


class PskLookup(Protocol):
    async def psk_for(self, ip: str) -> tuple[str, bytes] | None:
        """The (identity, key) the peer at `ip` must use; None for unknown or disabled SIMs
        (the peer gets no reply at all). Called for every new ClientHello (twice per
        handshake: before and after the cookie), so it should be cached. Must be an
        `async def`: the endpoint runs it synchronously up to its first suspension and
        makes a task only when it has to wait (no task for a cache hit)."""
        ...


class DatagramApp(Protocol):
    """What runs on top: the CoAP handler (any asyncio.DatagramProtocol fits)."""

    def connection_made(self, transport: DtlsTransport) -> None: ...

    def datagram_received(self, data: bytes, addr: Addr) -> None: ...


@dataclass(frozen=True, slots=True)
class DtlsConfig:
    max_sessions: int = 10_000
    """Sessions (established or handshaking) kept at once; admitting one more evicts the
    least recently active. The python-mbedtls backend needs ~50 KB per session."""
    idle_timeout_s: float = 3600.0
    """A session with no valid datagram from its peer for this long is forgotten (the
    device's next request then goes unanswered until it handshakes again)."""
    handshake_timeout_s: float = 30.0
    """A handshake not completed this long after its ClientHello is dropped."""
    max_handshakes: int = 1_000
    """Handshakes in progress at once (and, separately, PSK lookups in flight); beyond,
    ClientHellos are dropped (the device retransmits)."""
    handshakes_per_ip_per_s: float = 1.0
    """Token bucket refill: new handshakes per second per source IP, once the cookie is
    verified (spoofed ClientHellos cannot drain a device's bucket)."""
    handshake_burst_per_ip: int = 5
    """Token bucket size: back-to-back handshakes a source IP may start."""
    refused_interval_s: float = 60.0
    """`on_refused` is called at most once per source IP per interval."""
    mtu: int = 1280
    """Largest datagram the server builds (records are packed up to it)."""
    sweep_interval_s: float = 1.0
    """How often (real time) idle sessions and stalled handshakes are looked for."""
    rcvbuf: int = 4 * 1024 * 1024
    protocol: str = "COAP"
    """`simwire_dtls_total{protocol=..., outcome=...}` label of this port's handshake and
    session outcomes (`LWM2M` on LwM2M ports of their own)."""


def client_hello_random(data: bytes) -> bytes | None:
    """The client random when the datagram starts with an unfragmented epoch-0 ClientHello
    record (DTLS 1.0/1.2), else None. Cheap: the endpoint calls it on every datagram."""
    if (len(data) < 59 or data[0] != 22 or data[1] != 0xFE or data[3] or data[4]
            or data[13] != 1 or data[19] or data[20] or data[21]):
        return None
    return data[27:59]


class TokenBuckets:
    """Per-key token buckets (`rate` tokens/s, at most `burst`) on an injectable clock.
    Bounded: beyond `max_keys`, full buckets are forgotten, then all if still too many."""

    def __init__(self, clock: Clock, rate: float, burst: float, max_keys: int = 100_000):
        self._clock = clock
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> bool:
        """Takes a token if one is there."""
        now = self._clock.monotonic()
        tokens, last = self._state.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        ok = tokens >= 1.0
        self._state[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self._state) > self._max_keys:
            self._prune(now)
        return ok

    def _prune(self, now: float) -> None:
        full = [k for k, (t, last) in self._state.items()
                if t + (now - last) * self._rate >= self._burst]
        for k in full:
            del self._state[k]
        if len(self._state) > self._max_keys:
            self._state.clear()


class _Peer:
    __slots__ = ("addr", "identity", "last_seen", "random", "session", "started")

    def __init__(self, addr: Addr, session: DtlsSession, identity: str, random: bytes,
                 now: float) -> None:
        self.addr = addr
        self.session = session
        self.identity = identity
        self.random = random
        self.started = now
        self.last_seen = now


class DtlsTransport(asyncio.DatagramTransport):
    """Given to the application by `connection_made`: plaintext out, peer identities."""

    def __init__(self, endpoint: DtlsEndpoint, udp: asyncio.DatagramTransport) -> None:
        super().__init__()
        self._endpoint = endpoint
        self._udp = udp

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        """Encrypts `data` as one record for the established session at `addr` and sends
        it; dropped (and counted) when there is none (evicted, closed, never made)."""
        if isinstance(addr, tuple):
            self._endpoint.send_app(bytes(data), (addr[0], addr[1]))

    def identity(self, addr: Addr) -> str | None:
        """The authenticated PSK identity (ICCID) of the established session at `addr`."""
        return self._endpoint.identity(addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._udp.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._udp.is_closing()

    def close(self) -> None:
        self._udp.close()

    def abort(self) -> None:
        self._udp.abort()


class DtlsEndpoint(asyncio.DatagramProtocol):
    """The UDP protocol of the DTLS endpoint: sessions per (ip, port), the ClientHello
    path (PSK lookup, cookie, admission) and timeouts. Created by `serve`."""

    def __init__(
        self, app: DatagramApp, psk: PskLookup, backend: DtlsBackend, clock: Clock,
        metrics: Metrics | None = None, config: DtlsConfig | None = None,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self._app = app
        self._psk = psk
        self._backend = backend
        self._clock = clock
        self._cfg = cfg = config or DtlsConfig()
        self._on_refused = on_refused
        self._peers: OrderedDict[Addr, _Peer] = OrderedDict()  # least recently active first
        self._handshakes: OrderedDict[Addr, _Peer] = OrderedDict()  # oldest first
        self._lookups: set[Addr] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._buckets = TokenBuckets(clock, cfg.handshakes_per_ip_per_s,
                                     cfg.handshake_burst_per_ip)
        self._refusals = TokenBuckets(clock, 1.0 / max(cfg.refused_interval_s, 1e-9), 1.0)
        self._udp: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._warn = RateLimitedLogger(log)
        c = (metrics or Metrics()).dtls
        self._count: dict[str, Callable[[], None]] = {
            name: c.labels(cfg.protocol, name).inc for name in (
                "hello_verify", "handshake", "handshake_failed", "handshake_timeout",
                "unknown_peer", "rate_limited", "overloaded", "no_session", "idle_timeout",
                "evicted", "replaced", "closed", "session_error", "undeliverable", "oversized",
                "error",
            )
        }

    # -- introspection (tests, metrics) ------------------------------------------------

    @property
    def session_count(self) -> int:
        """Sessions kept, established or handshaking."""
        return len(self._peers)

    @property
    def handshake_count(self) -> int:
        return len(self._handshakes)

    def has_session(self, addr: Addr) -> bool:
        return addr in self._peers

    def cipher(self, addr: Addr) -> str | None:
        peer = self._peers.get(addr)
        return peer.session.cipher if peer is not None and peer.session.established else None

    def identity(self, addr: Addr) -> str | None:
        peer = self._peers.get(addr)
        if peer is None or not peer.session.established:
            return None
        return peer.identity

    # -- asyncio.DatagramProtocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        udp: asyncio.DatagramTransport = transport  # type: ignore[assignment]
        self._udp = udp
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        self._app.connection_made(DtlsTransport(self, udp))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._peers.clear()
        self._handshakes.clear()

    def error_received(self, exc: Exception) -> None:
        self._warn.warning("socket", "DTLS socket error: %s", exc)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        try:
            self._received(data, (addr[0], addr[1]))
        except Exception:  # a bug must not stop the endpoint: drop the datagram
            self._count["error"]()
            self._warn.exception(f"error:{addr[0]}", "DTLS datagram from %s failed", addr[0])

    # -- incoming ------------------------------------------------------------------------

    def _received(self, data: bytes, addr: Addr) -> None:
        if len(data) > MAX_DATAGRAM:
            self._count["oversized"]()
            return
        random = client_hello_random(data)
        peer = self._peers.get(addr)
        if peer is not None and (random is None or random == peer.random):
            if random is None or not peer.session.established:
                self._feed(peer, data)  # its records, or a retransmission of its hello
            return  # a late duplicate of the hello that made this session
        if random is None:
            self._count["no_session"]()  # no association: alerts, app data of a dropped one
            return
        # A new ClientHello. From a peer with a session (device reboot, new port mapping):
        # the old session stays until the new cookie is verified (RFC 6347 4.2.8).
        if addr in self._lookups:
            return  # retransmission while its PSK lookup runs
        ip = addr[0]
        lookup = self._psk.psk_for(ip)
        try:
            first = lookup.send(None)
        except StopIteration as done:  # answered without waiting (a cached lookup)
            self._hello(data, addr, random, done.value)
            return
        except Exception:
            self._count["error"]()
            self._warn.exception(f"psk:{ip}", "PSK lookup for %s failed", ip)
            return
        if len(self._lookups) >= self._cfg.max_handshakes:
            lookup.close()
            self._count["overloaded"]()
            return
        self._lookups.add(addr)
        task = asyncio.get_running_loop().create_task(
            self._hello_later(_Resumed(lookup, first), data, addr, random))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hello_later(self, lookup: _Resumed[tuple[str, bytes] | None], data: bytes,
                           addr: Addr, random: bytes) -> None:
        """The ClientHello path when `psk_for` has to wait (I/O)."""
        try:
            psk = await lookup
        except Exception:
            self._count["error"]()
            self._warn.exception(f"psk:{addr[0]}", "PSK lookup for %s failed", addr[0])
            return
        finally:
            self._lookups.discard(addr)
        self._hello(data, addr, random, psk)

    def _hello(self, data: bytes, addr: Addr, random: bytes,
               psk: tuple[str, bytes] | None) -> None:
        ip = addr[0]
        if psk is None:
            self._count["unknown_peer"]()
            self._refuse(ip, "no PSK for this IP (unknown or disabled SIM)")
            return
        if self._udp is None or self._udp.is_closing():
            return
        identity, key = psk
        try:
            replies, session = self._backend.hello(_peer_id(addr), data, identity, key)
        except Exception:
            self._count["error"]()
            self._warn.exception(f"hello:{ip}", "DTLS ClientHello from %s failed", ip)
            return
        for datagram in replies:
            self._udp.sendto(datagram, addr)
        if session is None:
            if replies:
                self._count["hello_verify"]()
            return
        # The cookie proves the peer receives at `addr`: admission control from here on.
        if len(self._handshakes) >= self._cfg.max_handshakes:
            self._count["overloaded"]()
            self._warn.warning("overloaded", "DTLS: %d handshakes in progress, dropping "
                               "ClientHello from %s", len(self._handshakes), ip)
            return
        if not self._buckets.take(ip):
            self._count["rate_limited"]()
            self._refuse(ip, "too many DTLS handshakes from this IP")
            return
        if self._drop(addr) is not None:
            self._count["replaced"]()
        while len(self._peers) >= self._cfg.max_sessions:
            self._count["evicted"]()
            self._drop(next(iter(self._peers)), notify=True)
        peer = _Peer(addr, session, identity, random, self._clock.monotonic())
        self._peers[addr] = peer
        self._handshakes[addr] = peer
        self._feed(peer, b"")

    def _feed(self, peer: _Peer, data: bytes) -> None:
        session = peer.session
        was_established = session.established
        try:
            records = session.receive(data)
        except DtlsClosed:
            self._count["closed"]()
            self._drop(peer.addr)
            return
        except DtlsError as exc:
            self._flush(peer)  # the fatal alert, if the backend queued one
            self._drop(peer.addr)
            ip = peer.addr[0]
            if was_established:
                self._count["session_error"]()
                self._warn.warning(f"session:{ip}", "DTLS session with %s failed: %s", ip, exc)
            else:
                self._count["handshake_failed"]()
                self._warn.warning(f"handshake:{ip}", "DTLS handshake with %s (expected "
                                   "identity %s) failed: %s", ip, peer.identity, exc)
                self._refuse(ip, f"DTLS handshake failed: {exc}")
            return
        self._flush(peer)
        if records or not was_established:  # authenticated activity (not a spoofer's junk)
            peer.last_seen = self._clock.monotonic()
            self._peers.move_to_end(peer.addr)
        if not was_established and session.established:
            self._handshakes.pop(peer.addr, None)
            self._count["handshake"]()
        for record in records:
            if self._peers.get(peer.addr) is not peer:
                break  # the application's reply failed and dropped the session
            self._app.datagram_received(record, peer.addr)

    # -- outgoing ------------------------------------------------------------------------

    def send_app(self, data: bytes, addr: Addr) -> None:
        """DtlsTransport.sendto: one application record to the session at `addr`."""
        peer = self._peers.get(addr)
        if peer is None or not peer.session.established:
            self._count["undeliverable"]()
            return
        try:
            peer.session.send(data)
        except DtlsError as exc:
            self._count["session_error"]()
            self._warn.warning(f"session:{addr[0]}", "DTLS send to %s failed: %s", addr[0], exc)
            self._drop(addr)
            return
        self._flush(peer)

    def _flush(self, peer: _Peer) -> None:
        udp = self._udp
        for datagram in peer.session.outgoing():
            if udp is not None:
                udp.sendto(datagram, peer.addr)

    # -- lifetimes -----------------------------------------------------------------------

    def _drop(self, addr: Addr, notify: bool = False) -> _Peer | None:
        """Forgets the session at `addr`; with `notify`, tells the peer (close_notify)."""
        peer = self._peers.pop(addr, None)
        if peer is None:
            return None
        self._handshakes.pop(addr, None)
        if notify and peer.session.established:
            peer.session.close()
            self._flush(peer)
        return peer

    def forget(self, ip: str) -> int:
        """Drops every session of `ip` (e.g. its SIM was disabled or its PSK changed), with
        close_notify; returns how many. Scans all sessions: for rare events only."""
        addrs = [addr for addr in self._peers if addr[0] == ip]
        for addr in addrs:
            self._drop(addr, notify=True)
        return len(addrs)

    def sweep(self) -> None:
        """Drops stalled handshakes and idle sessions (the sweeper calls it every
        `sweep_interval_s`; tests may call it after moving a ManualClock)."""
        now = self._clock.monotonic()
        cfg = self._cfg
        while self._handshakes:
            addr, peer = next(iter(self._handshakes.items()))
            if now - peer.started < cfg.handshake_timeout_s:
                break
            self._count["handshake_timeout"]()
            self._drop(addr)
            self._refuse(addr[0], "DTLS handshake timed out")
        while self._peers:
            addr, peer = next(iter(self._peers.items()))
            if now - peer.last_seen < cfg.idle_timeout_s:
                break
            self._count["idle_timeout"]()
            self._drop(addr, notify=True)

    async def _sweep_loop(self) -> None:
        """Housekeeping on real time; what expires is decided on the injectable clock (a
        ManualClock's sleepers stay those of the code under test)."""
        while True:
            await asyncio.sleep(self._cfg.sweep_interval_s)
            try:
                self.sweep()
            except Exception:
                self._warn.exception("sweep", "DTLS sweep failed")

    def _refuse(self, ip: str, reason: str) -> None:
        if self._on_refused is None or not self._refusals.take(ip):
            return
        try:
            self._on_refused(ip, reason)
        except Exception:
            self._warn.exception("on_refused", "DTLS on_refused callback failed")


class _Resumed(Generic[T]):
    """Awaitable rest of a coroutine that has already run to its first suspension (the
    endpoint starts `psk_for` synchronously and makes a task only if it has to wait).
    Awaiting it hands the pending future to the task and forwards what the task sends or
    throws, as `await coro` would have."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, T], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, T]:
        coro, pending = self._coro, self._first
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # e.g. the task's cancellation
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return cast(T, done.value)
                continue
            try:
                pending = coro.send(sent)
            except StopIteration as done:
                return cast(T, done.value)


def _peer_id(addr: Addr) -> bytes:
    """The transport address a cookie is bound to."""
    return f"{addr[0]}|{addr[1]}".encode()


@dataclass
class DtlsServer(DatagramServer):
    """A bound DTLS endpoint; `endpoint` for introspection (sessions, sweep)."""

    endpoint: DtlsEndpoint


async def serve(
    host: str, port: int, app: DatagramApp, psk: PskLookup, clock: Clock,
    metrics: Metrics | None = None, config: DtlsConfig | None = None,
    on_refused: Callable[[str, str], None] | None = None,
    backend: DtlsBackend | None = None, bind: BindUdp = bind_udp,
) -> DtlsServer:
    """Start the DTLS endpoint (called by simwire.app). `on_refused(ip, reason)` reports,
    at most once per IP per `refused_interval_s`, a peer that got no session: e.g. for an
    admin log. Reasons: no PSK for the IP (said before any reply, so the source address is
    unverified and may be spoofed), a failed or timed-out handshake, the per-IP rate limit.
    The default backend is python-mbedtls."""
    cfg = config or DtlsConfig()
    if backend is None:
        from integrator.endpoints.dtls_mbedtls import MbedtlsBackend  # optional dependency

        backend = MbedtlsBackend(mtu=cfg.mtu, handshake_timeout_s=cfg.handshake_timeout_s)
    endpoint = DtlsEndpoint(app, psk, backend, clock, metrics, cfg, on_refused)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: endpoint, sock=bind(host, port, cfg.rcvbuf))
    return DtlsServer(transport, endpoint)
