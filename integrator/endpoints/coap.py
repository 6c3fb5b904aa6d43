"""CoAP ingest endpoint (:5683, and behind DTLS on :5684), as 1NCE devices expect it
(spec sections 1.4, 1.5, 2.2).

POST on `/`, `/data` or no Uri-Path; CON (piggy-backed ACK) and NON (NON response); any
token; `t=` Uri-Query topic; 2.04 once the message is durably stored; 4.01 for unknown or
disabled SIMs; 4.00 for a bad topic; 4.04 for GET or unknown paths; duplicates of (peer,
MID) within EXCHANGE_LIFETIME get the same reply without being stored twice; malformed
datagrams are dropped silently and counted. `GET /bootstrap` (plain port only) answers the
Device Authenticator's `<iccid>,<psk>,<url>` through a hook. Behind DTLS the transport
names each peer's PSK identity, carried with the message. Knows only the wire format, the
pipeline and the bootstrap hook.

Server-initiated requests (LwM2M, CoAP downlinks) leave from the same socket through
`CoapServerProtocol.requests` (`integrator.coap_client.CoapRequests`, on the endpoint's
clock, sending through its transport: encrypted behind DTLS); incoming ACK/RST/responses
go to it first. An unexpected CON response is answered with RST, a CoAP ping (empty CON)
with RST; other unmatched ACK/RST/NON messages are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from integrator import coap
from integrator.coap_client import CoapRequests
from integrator.endpoints.datagram import BindUdp, DatagramServer, bind_udp
from integrator.pipeline import Ack, Pipeline
from simwire.clock import Clock
from simwire.logs import RateLimitedLogger
from simwire.metrics import Metrics
from simwire.model import Protocol, RawUplink

log = logging.getLogger("simwire.integrator.coap")

EXCHANGE_LIFETIME_S = 247.0
TOPIC_RE = re.compile(r"[A-Za-z0-9_/]{1,253}")
INGEST_PATHS = ((), ("",), ("data",))
BOOTSTRAP_PATH = ("bootstrap",)
BootstrapHook = Callable[[str], Awaitable[bytes | None]]
"""Source IP -> the /bootstrap payload, or None: unauthorized (authenticator.psk)."""


@dataclass(frozen=True, slots=True)
class RouteReply:
    """A routed handler's answer. `after` runs once the reply is sent (e.g. the LwM2M
    bootstrap server starts writing only after its 2.04)."""

    code: int
    payload: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()
    after: Callable[[], None] | None = None
    sdk_safe: bool = False
    """A NON reply's MID avoids bytes the 1NCE SDK's parser trips on (`/bootstrap`)."""


RouteHandler = Callable[[coap.Message, tuple[str, int], str | None], Awaitable[RouteReply]]
"""(request, peer address, DTLS identity or None) -> the reply. Routes are chosen by the
first Uri-Path segment (LwM2M: `rd`, `dp`, `bs`); the endpoint handles dedup, the message
type of the reply (ACK/NON) and errors (5.00)."""
# Options this endpoint understands; any other critical (odd) option -> 4.02.
KNOWN_OPTIONS = frozenset({
    coap.OPT_URI_HOST, coap.OPT_URI_PORT, coap.OPT_URI_PATH, coap.OPT_CONTENT_FORMAT,
    coap.OPT_URI_QUERY, coap.OPT_ACCEPT, coap.OPT_SIZE1, coap.OPT_NO_RESPONSE,
    coap.OPT_BLOCK1, coap.OPT_BLOCK2, coap.OPT_SIZE2,
})
CONTINUE = coap.code(2, 31)
REQUEST_ENTITY_INCOMPLETE = coap.code(4, 8)
_ACK_CODES = {
    Ack.STORED: coap.CHANGED,
    Ack.UNAUTHORIZED: coap.UNAUTHORIZED,
    Ack.FAILED: coap.INTERNAL_SERVER_ERROR,
}


@dataclass(frozen=True, slots=True)
class CoapConfig:
    max_payload: int = 1500
    """Larger payloads get 4.13 (1NCE documents 1024 B as the safe size)."""
    max_inflight: int = 10_000
    """Requests in the pipeline at once; beyond, new requests are dropped (CON retransmits)."""
    dedup_max_entries: int = 500_000
    """Bound on remembered (peer, MID) exchanges; the oldest are forgotten first."""
    rcvbuf: int = 4 * 1024 * 1024
    max_block_body: int = 64 * 1024
    """Largest request body a route (LwM2M) accepts in Block1 blocks; beyond: 4.13."""
    max_block_transfers: int = 10_000
    """Block1 transfers in progress at once; beyond, the least recently started is
    dropped (its next block gets 4.08)."""


class BlockTransfers:
    """Request bodies arriving in Block1 blocks (RFC 7959 section 2.5), for the routes.

    Keyed by peer and request URI (path and query); blocks must come in order from 0 (a
    block 0 restarts the transfer). A transfer is forgotten EXCHANGE_LIFETIME after its
    last block, or when `max_transfers` are in progress and a newer one starts. Entries
    are re-inserted on every block, so the dict's order is the order of last activity."""

    def __init__(self, clock: Clock, lifetime_s: float, max_body: int,
                 max_transfers: int) -> None:
        self._clock = clock
        self._lifetime = lifetime_s
        self._max_body = max_body
        self._max = max_transfers
        self._open: dict[tuple[object, ...], tuple[float, int, bytearray]] = {}

    def add(self, key: tuple[object, ...], block: coap.Block, payload: bytes,
            size1: int | None) -> bytes | tuple[int, str]:
        """The whole body once `block` is the last one, else (code, diagnostic): 2.31 for
        a block taken, 4.08 for one out of order, 4.13 for a body too large, 4.00 for a
        block that is not of its size."""
        now = self._clock.monotonic()
        stale = []
        for k, (seen, _, _) in self._open.items():  # oldest activity first
            if now - seen <= self._lifetime:
                break
            stale.append(k)
        for k in stale:
            del self._open[k]
        if block.num == 0:
            self._open.pop(key, None)
            if size1 is not None and size1 > self._max_body:
                return coap.REQUEST_ENTITY_TOO_LARGE, ""
            body = bytearray()
        else:
            entry = self._open.pop(key, None)
            if entry is None or entry[1] != block.num * block.size:
                return REQUEST_ENTITY_INCOMPLETE, "block out of order or unknown transfer"
            body = entry[2]
        if block.more and len(payload) != block.size:
            return coap.BAD_REQUEST, f"block {block.num} is not {block.size} bytes"
        body += payload
        if len(body) > self._max_body:
            return coap.REQUEST_ENTITY_TOO_LARGE, ""
        if not block.more:
            return bytes(body)
        if len(self._open) >= self._max:
            del self._open[next(iter(self._open))]
        self._open[key] = (now, len(body), body)
        return CONTINUE, ""

    def __len__(self) -> int:
        return len(self._open)


class Pending:
    """A dedup entry whose request is still being worked on (pipeline or route); replaced
    by the reply's bytes once they are sent."""

    __slots__ = ()


DedupKey = tuple[str, int, int]


class DedupCache:
    """(peer, MID) -> the reply sent, for EXCHANGE_LIFETIME; insertion order is expiry order.

    An answered entry holds only the reply's bytes (with its key tuples, no object the
    garbage collector has to scan: the cache holds up to `max_entries` of them for
    minutes); a request still in the works holds its `Pending` marker."""

    def __init__(self, clock: Clock, lifetime_s: float, max_entries: int) -> None:
        self._clock = clock
        self._lifetime = lifetime_s
        self._max = max_entries
        self._entries: dict[DedupKey, bytes | Pending] = {}
        self._order: deque[tuple[float, DedupKey]] = deque()

    def get(self, key: DedupKey) -> bytes | Pending | None:
        self._expire()
        return self._entries.get(key)

    def put(self, key: DedupKey, value: bytes | Pending) -> None:
        """A new exchange: its reply, or its `Pending` marker until `settle`."""
        self._entries[key] = value
        self._order.append((self._clock.monotonic() + self._lifetime, key))
        if len(self._order) > self._max:
            _, old = self._order.popleft()
            self._entries.pop(old, None)

    def settle(self, key: DedupKey, pending: Pending, data: bytes) -> None:
        """`pending`'s reply is sent: duplicates get `data` from now on (unless the entry
        was forgotten meanwhile, or replaced by a newer exchange with the same key)."""
        entries = self._entries
        if entries.get(key) is pending:
            entries[key] = data

    def _expire(self) -> None:
        now = self._clock.monotonic()
        order = self._order
        while order and order[0][0] <= now:
            _, key = order.popleft()
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class _IngestReply(Pending):
    """An ingest request in the pipeline: its dedup marker and the pipeline's `done`.

    One small object per message instead of a closure with its cells (fewer objects for
    the garbage collector while the message waits for its commit); it keeps what the
    reply needs (type, MID, token), not the parsed request."""

    __slots__ = ("_addr", "_endpoint", "_key", "_mid", "_mtype", "_token")

    def __init__(self, endpoint: CoapServerProtocol, key: DedupKey, addr: tuple[str, int],
                 msg: coap.Message) -> None:
        self._endpoint = endpoint
        self._key = key
        self._addr = addr
        self._mtype = msg.mtype
        self._mid = msg.mid
        self._token = msg.token

    def __call__(self, ack: Ack) -> None:  # after the commit (or the refusal)
        code = _ACK_CODES[ack]
        token = self._token
        endpoint = self._endpoint
        if self._mtype == coap.CON:  # the hot case: a bare piggy-backed ACK
            mid = self._mid
            data = bytes((0x60 | len(token), code, mid >> 8, mid & 0xFF)) + token
        else:
            data = endpoint._response(coap.Message(self._mtype, code, self._mid, token),
                                      code, b"")
        endpoint._dedup.settle(self._key, self, data)
        endpoint._send(data, self._addr)


class CoapServerProtocol(asyncio.DatagramProtocol):
    def __init__(
        self, pipeline: Pipeline, clock: Clock, metrics: Metrics, config: CoapConfig,
        protocol: Protocol = Protocol.COAP, bootstrap: BootstrapHook | None = None,
        routes: dict[str, RouteHandler] | None = None, ingest: bool = True,
    ) -> None:
        """`protocol`: the uplink protocol and metric label; `ingest=False`: only `routes`
        are served, any other path gets 4.04 (LwM2M ports of their own)."""
        self._pipeline = pipeline
        self.routes: dict[str, RouteHandler] = dict(routes or {})
        """First Uri-Path segment -> handler (the app adds LwM2M's after construction)."""
        self._ingest = ingest
        if bootstrap is not None:
            self.routes[BOOTSTRAP_PATH[0]] = bootstrap_route(bootstrap)
        self._identity: Callable[[tuple[str, int]], str | None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._clock = clock
        self._metrics = metrics
        self.config = config
        self._protocol = protocol
        self._dedup = DedupCache(clock, EXCHANGE_LIFETIME_S, config.dedup_max_entries)
        self._blocks = BlockTransfers(clock, EXCHANGE_LIFETIME_S, config.max_block_body,
                                      config.max_block_transfers)
        self._transport: asyncio.DatagramTransport | None = None
        self._mid = int.from_bytes(os.urandom(2), "big")
        self.requests = CoapRequests(self._send, clock)
        """Requests to devices from this socket; closed when the transport is lost."""
        self._warn = RateLimitedLogger(log)
        c = metrics.uplinks
        p = protocol.value
        self._count_malformed = c.labels(p, "malformed").inc
        self._count_duplicate = c.labels(p, "duplicate").inc
        self._count_bad = c.labels(p, "bad_request").inc
        self._count_overloaded = c.labels(p, "overloaded").inc

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a datagram transport
        self._identity = getattr(transport, "identity", None)  # DTLS: the peer's identity
        if self.requests.closed:  # a protocol reused on a new transport
            self.requests = CoapRequests(self._send, self._clock)

    def connection_lost(self, exc: Exception | None) -> None:
        self.requests.close()

    def error_received(self, exc: Exception) -> None:
        self._warn.warning("socket", "CoAP socket error: %s", exc)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = coap.parse(data)
        except coap.MalformedMessage as exc:
            self._count_malformed()
            self._warn.warning(f"malformed:{addr[0]}", "malformed CoAP datagram from %s: %s",
                               addr[0], exc)
            return
        if not msg.is_request:
            if self.requests.handle(msg, addr):
                return  # an ACK/RST/response to one of our requests (or a stray CON: RST)
            if msg.code == coap.EMPTY and msg.mtype == coap.CON:  # CoAP ping
                self._send(coap.serialize(coap.Message(coap.RST, coap.EMPTY, msg.mid)), addr)
            return  # unmatched ACK/RST/NON response: nothing outstanding
        if msg.mtype not in (coap.CON, coap.NON):
            self._count_malformed()
            return
        key = (addr[0], addr[1], msg.mid)
        seen = self._dedup.get(key)
        if seen is not None:
            self._count_duplicate()
            if type(seen) is bytes:
                self._send(seen, addr)
            return  # still in the pipeline: the reply follows
        self._handle(msg, addr, key)

    def _handle(self, msg: coap.Message, addr: tuple[str, int], key: DedupKey) -> None:
        path: list[str] = []
        query: list[str] = []
        block1: bytes | None = None
        for number, value in msg.options:
            if number == coap.OPT_URI_PATH:
                path.append(value.decode("utf-8", "replace"))
            elif number == coap.OPT_URI_QUERY:
                query.append(value.decode("utf-8", "replace"))
            elif number == coap.OPT_BLOCK1:
                block1 = value
            elif number & 1 and number not in KNOWN_OPTIONS:
                self._count_bad()
                self._finish(msg, addr, key, coap.BAD_OPTION, f"unsupported option {number}")
                return
        route = tuple(path)
        handler = self.routes.get(route[0]) if route else None
        if handler is not None:
            if block1 is None:
                self._answer_route(msg, addr, key, handler)
            else:
                self._route_block(msg, addr, key, handler, block1, (*route, "?", *query))
            return
        if block1 is not None:  # 1NCE's ingest takes single datagrams (<= 1024 B)
            self._count_bad()
            self._finish(msg, addr, key, coap.BAD_OPTION,
                         "block-wise transfers are for LwM2M only")
            return
        if route not in INGEST_PATHS or not self._ingest:
            self._finish(msg, addr, key, coap.NOT_FOUND, "Not Found")
            return
        if msg.code != coap.POST:
            code = coap.NOT_FOUND if msg.code == coap.GET else coap.METHOD_NOT_ALLOWED
            self._finish(msg, addr, key, code, "Not Found" if code == coap.NOT_FOUND else "")
            return
        topic = None
        for q in query:
            if q.startswith("t="):
                topic = q[2:]
                break
        if topic is not None and (not TOPIC_RE.fullmatch(topic) or "//" in topic):
            self._count_bad()
            self._finish(msg, addr, key, coap.BAD_REQUEST, "invalid topic")
            return
        if len(msg.payload) > self.config.max_payload:
            self._count_bad()
            self._finish(msg, addr, key, coap.REQUEST_ENTITY_TOO_LARGE, "",
                         [(coap.OPT_SIZE1, coap.uint_option(self.config.max_payload))])
            return
        if self._pipeline.inflight >= self.config.max_inflight:
            self._count_overloaded()
            return  # no dedup entry: the device's retransmission is a fresh attempt
        answer = _IngestReply(self, key, addr, msg)
        self._dedup.put(key, answer)
        identity = self._identity(addr) if self._identity is not None else None
        self._pipeline.submit(
            RawUplink(self._protocol, addr[0], addr[1], msg.payload, self._clock.now_ms(), topic,
                      identity),
            answer,
        )

    def _route_block(self, msg: coap.Message, addr: tuple[str, int], key: DedupKey,
                     handler: RouteHandler, raw: bytes, uri: tuple[str, ...]) -> None:
        """One Block1 block of a request to a route: 2.31 Continue until the last, then
        the route gets the whole body (its reply echoes the last Block1)."""
        try:
            block = coap.Block.parse(raw)
        except coap.MalformedMessage as exc:
            self._count_bad()
            self._finish(msg, addr, key, coap.BAD_REQUEST, str(exc))
            return
        size1 = msg.opt(coap.OPT_SIZE1)
        got = self._blocks.add((addr, uri), block, msg.payload,
                               None if size1 is None else int.from_bytes(size1, "big"))
        if isinstance(got, tuple):
            code, diagnostic = got
            options = [(coap.OPT_BLOCK1, raw)]
            if code == coap.REQUEST_ENTITY_TOO_LARGE:
                options = [(coap.OPT_SIZE1, coap.uint_option(self.config.max_block_body))]
            if code != CONTINUE:
                self._count_bad()
            self._finish(msg, addr, key, code, diagnostic, options)
            return
        whole = coap.Message(msg.mtype, msg.code, msg.mid, msg.token,
                             [o for o in msg.options if o[0] not in (coap.OPT_BLOCK1,
                                                                     coap.OPT_SIZE1)], got)
        self._answer_route(whole, addr, key, handler, ((coap.OPT_BLOCK1, raw),))

    def _answer_route(self, msg: coap.Message, addr: tuple[str, int],
                      key: DedupKey, handler: RouteHandler,
                      echo: tuple[tuple[int, bytes], ...] = ()) -> None:
        pending = Pending()
        self._dedup.put(key, pending)
        identity = self._identity(addr) if self._identity is not None else None

        async def run() -> None:
            reply: RouteReply | None = None
            try:
                reply = await handler(msg, addr, identity)
                data = self._response(msg, reply.code, reply.payload,
                                      [*reply.options, *echo], sdk_safe=reply.sdk_safe)
            except Exception:
                log.exception("CoAP route %s failed for %s", msg.options, addr[0])
                data = self._response(msg, coap.INTERNAL_SERVER_ERROR, b"")
                reply = None
            self._dedup.settle(key, pending, data)
            self._send(data, addr)
            if reply is not None and reply.after is not None:
                reply.after()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(
        self, msg: coap.Message, addr: tuple[str, int], key: DedupKey, code: int,
        diagnostic: str, options: list[tuple[int, bytes]] | None = None,
    ) -> None:
        data = self._response(msg, code, diagnostic.encode(), options)
        self._dedup.put(key, data)
        self._send(data, addr)

    def _response(
        self, req: coap.Message, code: int, payload: bytes,
        options: list[tuple[int, bytes]] | None = None, sdk_safe: bool = False,
    ) -> bytes:
        """`sdk_safe`: a NON reply's MID has no 0x00 byte and forms no "89" with its
        neighbours (the 1NCE SDK reads the reply with strstr; spec section 2.2)."""
        if req.mtype == coap.CON:
            if not payload and not options:  # the hot case: a bare piggy-backed ACK
                return bytes((0x60 | len(req.token), code, req.mid >> 8, req.mid & 0xFF)
                             ) + req.token
            mtype, mid = coap.ACK, req.mid
        else:
            self._mid = (self._mid + 1) & 0xFFFF
            while sdk_safe and not _sdk_safe_mid(self._mid):
                self._mid = (self._mid + 1) & 0xFFFF
            mtype, mid = coap.NON, self._mid
        return coap.serialize(coap.Message(mtype, code, mid, req.token,
                                           sorted(options or (), key=_number), payload))

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None:
            self._transport.sendto(data, addr)


def bootstrap_route(hook: BootstrapHook) -> RouteHandler:
    """`GET /bootstrap` as a route: 2.05 text/plain (zero-length Content-Format, SDK-safe
    MID) with the hook's payload, 4.01 when it refuses, 4.05 for other methods."""

    async def handle(msg: coap.Message, addr: tuple[str, int], identity: str | None
                     ) -> RouteReply:
        if [v for n, v in msg.options if n == coap.OPT_URI_PATH] != [b"bootstrap"]:
            return RouteReply(coap.NOT_FOUND, b"Not Found")
        if msg.code != coap.GET:
            return RouteReply(coap.METHOD_NOT_ALLOWED)
        payload = await hook(addr[0])
        if payload is None:
            return RouteReply(coap.UNAUTHORIZED)
        return RouteReply(coap.CONTENT, payload, ((coap.OPT_CONTENT_FORMAT, b""),),
                          sdk_safe=True)

    return handle


def _sdk_safe_mid(mid: int) -> bool:
    hi, lo = mid >> 8, mid & 0xFF
    return 0 not in (hi, lo) and (hi, lo) != (0x38, 0x39) and lo != 0x38


async def serve(host: str, port: int, protocol: CoapServerProtocol,
                bind: BindUdp = bind_udp) -> DatagramServer:
    """Start a plain CoAP endpoint running `protocol`; called by simwire.app."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: protocol, sock=bind(host, port, protocol.config.rcvbuf))
    return DatagramServer(transport)


def _number(option: tuple[int, bytes]) -> int:
    return option[0]
