"""Server-initiated CoAP requests (RFC 7252) and observations (RFC 7641), transport-agnostic.

LwM2M (the server reads/writes/executes/observes resources on registered devices; the
bootstrap server writes /0 and /1) and the Device Controller's CoAP downlinks send requests
*to* devices from the endpoint's own socket (devices behind NAT answer to where the request
came from). `CoapRequests` is the client half of that socket: it gets a `send(data, addr)`
callable (the endpoint's transport, plain UDP or the DTLS transport, which encrypts) and the
endpoint hands it every incoming message that is not a request (`handle`).

Messaging layer (RFC 7252 section 4):
- MIDs count up per peer from a random start (remembered for `max_peers` peers, least
  recently used forgotten first) and skip MIDs still outstanding to that peer; tokens are
  8 random bytes, unique among outstanding exchanges, observations and cancelled
  observations.
- A CON request is retransmitted on the injectable clock: the first timeout is random in
  [ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR] and doubles after every retransmission;
  after MAX_RETRANSMIT retransmissions and one more (doubled) timeout the request fails
  with `CoapTimeout`: 31 x the first timeout for the defaults, at most MAX_TRANSMIT_WAIT
  (93 s).
- An empty ACK stops retransmission; the separate response (CON, which we ACK, or NON) is
  matched by token and source address and awaited up to `separate_timeout_s` (default
  EXCHANGE_LIFETIME). A piggy-backed response must match the MID and the token. An RST
  with the request's MID fails it with `CoapReset`. A NON request waits `non_timeout_s`
  (default MAX_TRANSMIT_WAIT) for a response matched by token.
- Congestion control (section 4.7): at most `nstart` (NSTART, 1) outstanding interactions
  per peer; further requests to that peer wait their turn in FIFO order (the wait does not
  count towards their timeouts). An interaction stops being outstanding at the ACK, the
  response, the RST or the timeout.
- Duplicate CON responses/notifications (the peer missed our ACK) are ACKed again for
  EXCHANGE_LIFETIME without being delivered twice; duplicate ACK/NON responses are
  ignored. An unexpected CON response (unknown token: a request that timed out, was
  cancelled, or never existed) is answered with RST (section 4.2, RFC 7641 section 3.6);
  unexpected ACKs, RSTs and NON responses are ignored (`handle` returns False).

Observe (RFC 7641): pass `observe=callback` to `request`; the request gets Observe=0 unless
the caller put an Observe option in. The first response completes the request; if it is a
2.xx with an Observe option the observation is kept under the request's token and every
later notification (CON, ACKed, or NON) from that peer with that token goes to the callback
unless it is older than the last one delivered (section 3.4: sequence numbers compared
modulo 2^24, anything after 128 s counts as fresh). A notification without Observe option
or with a non-2.xx code ends the observation (it is still delivered). `cancel_observation`
cancels reactively: the next notification is answered with RST. To cancel explicitly, the
caller sends `request(addr, GET, [..., (OPT_OBSERVE, b"\\x01")], token=<the observation's
token>)`: an explicit `token` that belongs to an observation (or a reactively cancelled
one) to that peer takes it over; notifications still arriving on that token during the
deregistration are ACKed and dropped.

State is bounded: `max_per_peer` requests per peer (outstanding and queued) and
`max_total` in all, `max_observations` observations; beyond, `request` raises
`CoapOverloaded`. Time goes through `Clock` (`ManualClock` in tests). Cancelling the task
awaiting `request` cancels the exchange: no more retransmissions, a late CON response gets
RST. `close` fails everything outstanding with `CoapClosed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections import deque
from collections.abc import Callable, Iterable

from integrator import coap
from simwire.clock import Clock

log = logging.getLogger("simwire.integrator.coap_client")

Addr = tuple[str, int]
Observer = Callable[[coap.Message], None]

OBSERVE_REGISTER = b""  # Observe=0 (uint 0 is the zero-length value)
OBSERVE_DEREGISTER = b"\x01"
OBSERVE_FRESH_S = 128.0
"""RFC 7641 section 3.4: a notification arriving this long after the last one is fresh."""
_SEQ_HALF = 1 << 23


class CoapError(Exception):
    """A request that got no response."""


class CoapTimeout(CoapError, TimeoutError):
    """No ACK/response within the retransmission schedule (or the response timeout)."""


class CoapReset(CoapError):
    """The peer answered the request with RST."""


class CoapClosed(CoapError):
    """The requester was closed (the endpoint's transport went away)."""


class CoapOverloaded(CoapError):
    """Too many requests outstanding (to this peer, or in all)."""


class _Peer:
    """Per-peer request accounting: NSTART slots and the FIFO of requests waiting for one."""

    __slots__ = ("busy", "count", "waiters")

    def __init__(self) -> None:
        self.busy = 0  # outstanding interactions (NSTART)
        self.count = 0  # requests outstanding or queued (max_per_peer)
        self.waiters: deque[asyncio.Future[None]] = deque()


class _Exchange:
    __slots__ = ("acked", "addr", "confirmable", "data", "deregister", "future", "mid",
                 "observe", "peer", "slot", "timer", "token")

    def __init__(self, addr: Addr, peer: _Peer, mid: int, token: bytes, data: bytes,
                 confirmable: bool, observe: Observer | None, deregister: bool,
                 future: asyncio.Future[coap.Message]) -> None:
        self.addr = addr
        self.peer = peer
        self.mid = mid
        self.token = token
        self.data = data
        self.confirmable = confirmable
        self.observe = observe
        self.deregister = deregister
        self.future = future
        self.acked = False
        self.slot = True  # holds one of the peer's NSTART slots
        self.timer: asyncio.Task[None] | None = None


class _Observation:
    __slots__ = ("addr", "callback", "seen", "seq")

    def __init__(self, addr: Addr, callback: Observer, seq: int, seen: float) -> None:
        self.addr = addr
        self.callback = callback
        self.seq = seq
        self.seen = seen


class CoapRequests:
    """Requests from one socket to its peers; see the module docstring."""

    def __init__(
        self, send: Callable[[bytes, Addr], None], clock: Clock, *,
        ack_timeout_s: float = 2.0, ack_random_factor: float = 1.5, max_retransmit: int = 4,
        exchange_lifetime_s: float = 247.0, non_timeout_s: float | None = None,
        separate_timeout_s: float | None = None, nstart: int = 1, max_per_peer: int = 16,
        max_total: int = 10_000, max_observations: int = 100_000, max_peers: int = 100_000,
        max_body: int = 64 * 1024, rng: random.Random | None = None,
    ) -> None:
        """`rng` draws the first retransmission timeouts, MID starts and tokens; give a
        seeded one only in tests (tokens then become predictable). Default: os.urandom."""
        if nstart < 1 or max_per_peer < 1 or max_total < 1:
            raise ValueError("nstart, max_per_peer and max_total must be >= 1")
        self._send = send
        self._clock = clock
        self._ack_timeout = ack_timeout_s
        self._random_factor = ack_random_factor
        self._max_retransmit = max_retransmit
        self._lifetime = exchange_lifetime_s
        max_transmit_wait = ack_timeout_s * ((1 << (max_retransmit + 1)) - 1) * ack_random_factor
        self._non_timeout = max_transmit_wait if non_timeout_s is None else non_timeout_s
        self._separate_timeout = (exchange_lifetime_s if separate_timeout_s is None
                                  else separate_timeout_s)
        self._nstart = nstart
        self._max_per_peer = max_per_peer
        self._max_total = max_total
        self._max_observations = max_observations
        self._max_peers = max_peers
        self._max_body = max_body
        self._rng = rng if rng is not None else random.SystemRandom()
        self._seeded = rng is not None
        self._closed = False
        self._total = 0
        self._peers: dict[Addr, _Peer] = {}
        self._mids: dict[Addr, int] = {}  # last MID sent per peer; insertion order = LRU
        self._by_mid: dict[tuple[Addr, int], _Exchange] = {}  # awaiting ACK/RST
        self._by_token: dict[bytes, _Exchange] = {}  # awaiting the response
        self._observations: dict[bytes, _Observation] = {}
        self._rejected: dict[bytes, Addr] = {}  # reactively cancelled: RST the next one
        self._acked: dict[tuple[Addr, int], bytes] = {}  # CON we ACKed -> the ACK
        self._acked_order: deque[tuple[float, tuple[Addr, int]]] = deque()
        self._acked_max = max(4 * max_total, 1024)

    # -- introspection -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def outstanding(self) -> int:
        """Requests outstanding or queued, all peers."""
        return self._total

    @property
    def observations(self) -> dict[bytes, Addr]:
        """Token -> peer of each active observation (a copy)."""
        return {token: obs.addr for token, obs in self._observations.items()}

    # -- requests ------------------------------------------------------------------------

    async def request(
        self, addr: Addr, code: int, options: Iterable[tuple[int, bytes]] = (),
        payload: bytes = b"", *, confirmable: bool = True, observe: Observer | None = None,
        token: bytes | None = None,
    ) -> coap.Message:
        """Send a request to `addr` and return the response (any code: 2.xx, 4.xx, 5.xx).

        `observe`: register an observation (Observe=0 added unless `options` has an Observe
        option); later notifications go to the callback (it must not block or raise).
        `token`: reuse a token (explicit deregistration, RFC 7641 section 3.6); by default a
        fresh random one. A 2.xx response in blocks (Block2 with the more flag) is
        completed first (`fetch_blocks`). Raises CoapTimeout, CoapReset, CoapClosed,
        CoapOverloaded, CoapError (a broken block-wise transfer)."""
        res = await self._exchange(addr, code, options, payload, confirmable, observe, token)
        if res.code >> 5 == 2 and res.opt(coap.OPT_BLOCK2) is not None:
            return await self.fetch_blocks(addr, code, options, payload, res,
                                           confirmable=confirmable)
        return res

    async def fetch_blocks(
        self, addr: Addr, code: int, options: Iterable[tuple[int, bytes]], payload: bytes,
        first: coap.Message, *, confirmable: bool = True,
    ) -> coap.Message:
        """RFC 7959 section 2.4: `first` (a response or notification carrying Block2) with
        the blocks after it, fetched by repeating the request (its options without Observe,
        Block2 = the next block, the size the peer chose, a fresh token) until one comes
        without the more flag. Returns `first` with the whole body and no Block2 option.
        CoapError when a block is missing, out of place or not 2.xx, or the body would
        exceed `max_body` bytes."""
        raw = first.opt(coap.OPT_BLOCK2)
        try:
            block = coap.Block.parse(raw or b"")
        except coap.MalformedMessage as exc:
            raise CoapError(f"bad Block2 option: {exc}") from None
        if block.num != 0:
            raise CoapError(f"a block-wise response starting at block {block.num}")
        body = bytearray(first.payload)
        base = [(n, v) for n, v in options if n not in (coap.OPT_OBSERVE, coap.OPT_BLOCK2)]
        while block.more:
            offset = len(body)
            if offset % block.size or offset == 0:
                raise CoapError(f"block-wise response: a block of {offset} bytes is not "
                                f"a multiple of its size {block.size}")
            if offset >= self._max_body:
                raise CoapError(f"block-wise response larger than {self._max_body} bytes")
            want = coap.Block(offset // block.size, False, block.szx)
            res = await self._exchange(addr, code, [*base, (coap.OPT_BLOCK2, want.encode())],
                                       payload, confirmable, None, None)
            if res.code >> 5 != 2:
                raise CoapError(f"block {want.num} of the response answered "
                                f"{coap.code_str(res.code)}")
            try:
                block = coap.Block.parse(res.opt(coap.OPT_BLOCK2) or b"\x07")
            except coap.MalformedMessage:
                raise CoapError(f"block {want.num} came without a valid Block2 option"
                                ) from None
            if block.num * block.size != offset:
                raise CoapError(f"asked for the block at byte {offset}, got the one at "
                                f"{block.num * block.size}")
            body += res.payload
        if len(body) > self._max_body:
            raise CoapError(f"block-wise response larger than {self._max_body} bytes")
        return coap.Message(first.mtype, first.code, first.mid, first.token,
                            [(n, v) for n, v in first.options if n != coap.OPT_BLOCK2],
                            bytes(body))

    async def _exchange(
        self, addr: Addr, code: int, options: Iterable[tuple[int, bytes]], payload: bytes,
        confirmable: bool, observe: Observer | None, token: bytes | None,
    ) -> coap.Message:
        """One request/response exchange (`request` without the block-wise follow-up)."""
        if not 1 <= code <= 31:
            raise ValueError(f"not a request code: {coap.code_str(code)}")
        if self._closed:
            raise CoapClosed("CoAP requester closed")
        addr = (addr[0], addr[1])
        opts = list(options)
        if observe is not None:
            if len(self._observations) >= self._max_observations:
                raise CoapOverloaded("too many observations")
            if not any(n == coap.OPT_OBSERVE for n, _ in opts):
                opts.append((coap.OPT_OBSERVE, OBSERVE_REGISTER))
        if self._total >= self._max_total:
            raise CoapOverloaded("too many outstanding CoAP requests")
        peer = self._peers.get(addr)
        if peer is None:
            peer = self._peers[addr] = _Peer()
        elif peer.count >= self._max_per_peer:
            raise CoapOverloaded(f"too many outstanding CoAP requests to {addr[0]}:{addr[1]}")
        peer.count += 1
        self._total += 1
        ex: _Exchange | None = None
        slot = False
        try:
            if token is not None:
                self._claim_token(token, addr)  # takes the token over from its observation
            await self._take_slot(peer)
            slot = True
            if self._closed:
                raise CoapClosed("CoAP requester closed")
            if token is not None:
                self._claim_token(token, addr)  # again: another request may have taken it
            else:
                token = self._new_token()
            deregister = any(n == coap.OPT_OBSERVE and v == OBSERVE_DEREGISTER for n, v in opts)
            mid = self.next_mid(addr)
            data = coap.serialize(coap.Message(coap.CON if confirmable else coap.NON, code, mid,
                                               token, opts, payload))
            loop = asyncio.get_running_loop()
            ex = _Exchange(addr, peer, mid, token, data, confirmable, observe, deregister,
                           loop.create_future())
            self._by_mid[(addr, mid)] = ex
            self._by_token[token] = ex
            self._send(data, addr)
            ex.timer = loop.create_task(
                self._retransmit(ex) if confirmable else self._expire(ex, self._non_timeout))
            return await ex.future
        finally:
            if ex is not None:
                self._settle(ex)  # also on cancellation: no more retransmissions
            elif slot:
                self._release_slot(peer)
            peer.count -= 1
            self._total -= 1
            if peer.count == 0 and self._peers.get(addr) is peer:
                del self._peers[addr]

    def next_mid(self, addr: Addr) -> int:
        """The next MID for a message to `addr` (skips MIDs outstanding to it)."""
        mids = self._mids
        last = mids.pop(addr, None)
        mid = self._rng.randrange(0x10000) if last is None else (last + 1) & 0xFFFF
        while (addr, mid) in self._by_mid:
            mid = (mid + 1) & 0xFFFF
        mids[addr] = mid
        if len(mids) > self._max_peers:
            del mids[next(iter(mids))]
        return mid

    def cancel_observation(self, token: bytes) -> bool:
        """Forget the observation; its next notification is answered with RST (reactive
        cancellation, RFC 7641 section 3.6). False if there was none."""
        obs = self._observations.pop(token, None)
        if obs is None:
            return False
        self._reject(token, obs.addr)
        return True

    def close(self) -> None:
        """Fail every outstanding and queued request with CoapClosed; drop observations."""
        if self._closed:
            return
        self._closed = True
        exc = CoapClosed("CoAP requester closed")
        for peer in self._peers.values():  # first: a freed slot must not start a request
            while peer.waiters:
                waiter = peer.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(exc)
        for ex in list(self._by_token.values()) + list(self._by_mid.values()):
            self._fail(ex, exc)
        self._observations.clear()
        self._rejected.clear()
        self._acked.clear()
        self._acked_order.clear()

    # -- incoming ------------------------------------------------------------------------

    def handle(self, msg: coap.Message, addr: Addr) -> bool:
        """An incoming message that is not a request (ACK, RST, response). True: it was
        ours (matched, duplicate, or an unexpected CON response we answered with RST);
        False: the caller's (empty CON/NON pings, unmatched ACK/RST/NON)."""
        if self._closed or msg.is_request:
            return False
        addr = (addr[0], addr[1])
        mtype = msg.mtype
        if msg.code == coap.EMPTY:
            if mtype == coap.ACK:
                ex = self._by_mid.get((addr, msg.mid))
                if ex is None or not ex.confirmable:
                    return False
                self._acknowledged(ex)
                return True
            if mtype == coap.RST:
                ex = self._by_mid.get((addr, msg.mid))
                if ex is None:
                    return False
                self._fail(ex, CoapReset(
                    f"{addr[0]}:{addr[1]} reset the request (MID {msg.mid})"))
                return True
            return False  # CoAP ping (CON) or an empty NON: the endpoint's
        if not 2 <= msg.code >> 5 <= 5:
            return False  # reserved classes (1, 6, 7): not a response
        if mtype == coap.ACK:
            ex = self._by_mid.get((addr, msg.mid))
            if ex is None or not ex.confirmable or ex.token != msg.token:
                return False
            self._complete(ex, msg)
            return True
        if mtype == coap.RST:
            return False  # RST must be empty (a format error): ignore
        key = (addr, msg.mid)
        if mtype == coap.CON:
            ack = self._acked_get(key)
            if ack is not None:  # a retransmission: our ACK was lost
                self._send(ack, addr)
                return True
        token = msg.token
        ex = self._by_token.get(token)
        if ex is not None and ex.addr == addr:
            self._ack(msg, addr)
            if ex.deregister and msg.opt(coap.OPT_OBSERVE) is not None:
                return True  # a notification crossing the deregistration: dropped
            self._complete(ex, msg)
            return True
        obs = self._observations.get(token)
        if obs is not None and obs.addr == addr:
            self._ack(msg, addr)
            self._notify(token, obs, msg)
            return True
        if self._rejected.get(token) == addr:
            del self._rejected[token]
            self._reset(msg.mid, addr)
            return True
        if mtype == coap.CON:
            self._reset(msg.mid, addr)
            return True
        return False

    # -- internals -----------------------------------------------------------------------

    async def _take_slot(self, peer: _Peer) -> None:
        if peer.busy < self._nstart and not peer.waiters:
            peer.busy += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        peer.waiters.append(waiter)
        try:
            await waiter  # _release_slot hands the slot over (busy already counted)
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release_slot(peer)  # granted, then cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    peer.waiters.remove(waiter)
            raise

    def _release_slot(self, peer: _Peer) -> None:
        peer.busy -= 1
        while peer.waiters and not self._closed:
            waiter = peer.waiters.popleft()
            if not waiter.done():
                peer.busy += 1
                waiter.set_result(None)
                return

    def _new_token(self) -> bytes:
        while True:
            token = self._rng.randbytes(8) if self._seeded else os.urandom(8)
            if (token not in self._by_token and token not in self._observations
                    and token not in self._rejected):
                return token

    def _claim_token(self, token: bytes, addr: Addr) -> None:
        if len(token) > 8:
            raise ValueError("a CoAP token is at most 8 bytes")
        if token in self._by_token:
            raise ValueError(f"token {token.hex()} is in use by an outstanding request")
        obs = self._observations.get(token)
        other = obs.addr if obs is not None else self._rejected.get(token)
        if other is not None and other != addr:
            raise ValueError(f"token {token.hex()} belongs to an observation of another peer")
        self._observations.pop(token, None)
        self._rejected.pop(token, None)

    async def _retransmit(self, ex: _Exchange) -> None:
        timeout = self._rng.uniform(self._ack_timeout, self._ack_timeout * self._random_factor)
        for _ in range(self._max_retransmit):
            await self._clock.sleep(timeout)
            try:
                self._send(ex.data, ex.addr)
            except Exception:
                log.exception("CoAP retransmission to %s failed", ex.addr[0])
            timeout *= 2
        await self._clock.sleep(timeout)
        self._fail(ex, CoapTimeout(
            f"no ACK from {ex.addr[0]}:{ex.addr[1]} after {self._max_retransmit} "
            "retransmissions"))

    async def _expire(self, ex: _Exchange, seconds: float) -> None:
        await self._clock.sleep(seconds)
        self._fail(ex, CoapTimeout(
            f"no response from {ex.addr[0]}:{ex.addr[1]} within {seconds:g} s"))

    def _acknowledged(self, ex: _Exchange) -> None:
        """Empty ACK: stop retransmitting, free the NSTART slot, await the response."""
        ex.acked = True
        self._by_mid.pop((ex.addr, ex.mid), None)
        self._free(ex)
        self._stop_timer(ex)
        ex.timer = asyncio.get_running_loop().create_task(
            self._expire(ex, self._separate_timeout))

    def _complete(self, ex: _Exchange, msg: coap.Message) -> None:
        self._settle(ex)
        if ex.future.done():
            return
        ex.future.set_result(msg)
        if ex.observe is None or not 2 << 5 <= msg.code < 3 << 5:
            return
        value = msg.opt(coap.OPT_OBSERVE)
        if value is None:
            return  # the peer did not add us as an observer
        self._observations[ex.token] = _Observation(
            ex.addr, ex.observe, int.from_bytes(value, "big"), self._clock.monotonic())

    def _fail(self, ex: _Exchange, exc: BaseException) -> None:
        self._settle(ex)
        if not ex.future.done():
            ex.future.set_exception(exc)

    def _settle(self, ex: _Exchange) -> None:
        """Forget the exchange (idempotent): tables, timer, NSTART slot."""
        if self._by_mid.get((ex.addr, ex.mid)) is ex:
            del self._by_mid[(ex.addr, ex.mid)]
        if self._by_token.get(ex.token) is ex:
            del self._by_token[ex.token]
        self._stop_timer(ex)
        self._free(ex)

    def _free(self, ex: _Exchange) -> None:
        if ex.slot:
            ex.slot = False
            self._release_slot(ex.peer)

    @staticmethod
    def _stop_timer(ex: _Exchange) -> None:
        timer, ex.timer = ex.timer, None
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()

    def _notify(self, token: bytes, obs: _Observation, msg: coap.Message) -> None:
        value = msg.opt(coap.OPT_OBSERVE)
        now = self._clock.monotonic()
        if value is None or not 2 << 5 <= msg.code < 3 << 5:
            del self._observations[token]  # the final response: the observation ended
        else:
            seq = int.from_bytes(value, "big")
            v1 = obs.seq
            if not ((v1 < seq and seq - v1 < _SEQ_HALF) or (v1 > seq and v1 - seq > _SEQ_HALF)
                    or now > obs.seen + OBSERVE_FRESH_S):
                return  # older than (or the same as) the last one delivered
            obs.seq, obs.seen = seq, now
        try:
            obs.callback(msg)
        except Exception:
            log.exception("CoAP observation callback failed (token %s)", token.hex())

    def _ack(self, msg: coap.Message, addr: Addr) -> None:
        if msg.mtype != coap.CON:
            return
        ack = bytes((0x60, coap.EMPTY, msg.mid >> 8, msg.mid & 0xFF))
        self._send(ack, addr)
        key = (addr, msg.mid)
        self._acked[key] = ack
        order = self._acked_order
        order.append((self._clock.monotonic() + self._lifetime, key))
        if len(order) > self._acked_max:
            _, old = order.popleft()
            self._acked.pop(old, None)

    def _acked_get(self, key: tuple[Addr, int]) -> bytes | None:
        now = self._clock.monotonic()
        order = self._acked_order
        while order and order[0][0] <= now:
            _, old = order.popleft()
            self._acked.pop(old, None)
        return self._acked.get(key)

    def _reset(self, mid: int, addr: Addr) -> None:
        self._send(bytes((0x70, coap.EMPTY, mid >> 8, mid & 0xFF)), addr)

    def _reject(self, token: bytes, addr: Addr) -> None:
        rejected = self._rejected
        rejected[token] = addr
        if len(rejected) > self._max_observations:
            del rejected[next(iter(rejected))]
