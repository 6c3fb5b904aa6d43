"""A pool of MQTT-over-TLS publishers for AWS IoT Core (or any MQTT 3.1.1 broker).

The AWS IoT sink builds one `MqttPool` per integration, calls `start()` once, `publish()` per
event (concurrently) and `close()` when the integration stops or changes.

Design:

- Each of `connections` connections is a paho-mqtt client (`{client_id}-{i}`, MQTT 3.1.1,
  clean session) with its own network thread (`loop_start`). The first connect runs up to
  the CONNACK in a worker thread (`asyncio.to_thread`), so a pool that fails to start has no
  thread to stop; afterwards paho reconnects by itself with exponential backoff
  (`reconnect_delay_set`). Nothing blocking runs on the event loop.
- paho callbacks run on the network threads and only hand over to the event loop with
  `loop.call_soon_threadsafe`; all pool state (connection up/down, futures of publishes in
  flight keyed by packet id `mid`) is touched on the event loop only.
- `publish` picks the connected connection that can send soonest (its token bucket, then
  fewest publishes in flight), waits for a send slot of that connection's token bucket (each
  connection stays under `max_rate` publishes/s, AWS IoT's per-connection limit), publishes
  and waits for the PUBACK (QoS 1). A timeout, a refusal, or the connection dropping while
  the publish is in flight raises `DeliveryError`; the dispatcher retries. paho still resends
  an unacknowledged message after it reconnects, so a receiver may see an event twice (it
  deduplicates on the event id).
- TLS: one `ssl.SSLContext` for all connections, trusting `ca_pem` (or the system store,
  which holds the Amazon Root CAs) and presenting the client certificate. `ssl` loads keys
  from files only, so the PEMs go to 0600 files in a private temporary directory that is
  removed right after loading. `alpn=True` offers ALPN "x-amzn-mqtt-ca" (AWS IoT on 443).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from integrator.forwarders.base import DeliveryError

log = logging.getLogger("integrator.forwarders.mqtt")

AWS_ALPN = "x-amzn-mqtt-ca"
MAX_IN_FLIGHT = 100
"""Unacknowledged QoS 1 publishes per connection (AWS IoT's limit); more wait in paho."""


class TokenBucket:
    """Reservation-style token bucket: `rate` tokens/s, at most `burst` banked.

    `MqttPool` keeps one per connection and calls `acquire` before every publish; `reserve`
    and `delay` are the clock-only parts (tests drive them with a fake `monotonic`)."""

    def __init__(
        self, rate: float, burst: float = 1.0, *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._rate = rate
        self._burst = burst
        self._monotonic = monotonic
        self._sleep = sleep
        self._tokens = burst
        self._stamp = monotonic()

    def _refill(self) -> None:
        now = self._monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def delay(self) -> float:
        """Seconds a `reserve()` now would have to wait (nothing is taken)."""
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self._rate

    def reserve(self) -> float:
        """Take a token now (possibly on credit); returns the seconds to wait before using
        it. Concurrent reservations queue up: each waits for the debt ahead of it."""
        self._refill()
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    async def acquire(self) -> None:
        """Reserve a token and sleep until it may be used."""
        wait = self.reserve()
        if wait > 0:
            await self._sleep(wait)


class _Connection:
    """One paho client of a pool. The `_on_*` callbacks run on paho's thread (the network
    thread, or the worker doing the first connect) and post to the pool's event loop; the
    other methods run on the event loop."""

    def __init__(self, pool: MqttPool, client_id: str, bucket: TokenBucket) -> None:
        self.pool = pool
        self.client_id = client_id
        self.bucket = bucket
        self.up = False
        self.last_error: str | None = None
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.threaded = False
        # paho-thread side: the first connection's outcome, the last error paho logged
        self._first_done = False
        self._first_error: str | None = None
        self._log_error: str | None = None
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
        )
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        self.client = client

    # -- paho's thread --------------------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self.loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the pool is gone
            loop.call_soon_threadsafe(callback, *args)

    def _on_log(self, _client: mqtt.Client, _userdata: Any, level: int, message: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:  # e.g. "failed to receive on socket: [SSL: ...]"
            self._log_error = message

    def _on_connect(
        self, _client: mqtt.Client, _userdata: Any, _flags: mqtt.ConnectFlags,
        reason: ReasonCode, _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            error: str | None = f"refused by the broker: {reason}"
            self._post(self._went_down, error)
        else:
            error = None
            self._post(self._went_up)
        if not self._first_done:
            self._first_done, self._first_error = True, error

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: mqtt.DisconnectFlags,
        reason: ReasonCode, _properties: Properties | None,
    ) -> None:
        detail, self._log_error = self._log_error, None
        error = f"connection lost: {detail or reason}"
        if not self._first_done:
            self._first_done, self._first_error = True, f"closed before CONNACK: {detail or reason}"
        self._post(self._went_down, error)

    def _on_publish(
        self, _client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._post(self._acked, mid, None if not reason.is_failure else str(reason))

    def _first_connect(
        self, host: str, port: int, keepalive_s: int, timeout_s: float
    ) -> str | None:
        """In a worker thread: connect and drive paho (its external-loop API: `loop()` would
        leak the socket pair `loop_start` replaces) until CONNACK, failure or timeout.
        Returns the error, None once connected; raises OSError (TCP, TLS handshake)."""
        client = self.client
        client.connect(host, port, keepalive_s)
        deadline = time.monotonic() + timeout_s
        while not self._first_done:
            remaining = deadline - time.monotonic()
            sock = client.socket()
            if sock is None:
                break
            if remaining <= 0:
                return f"no CONNACK within {timeout_s:g}s"
            buffered = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            readable: list[Any] = [sock] if buffered else []
            writable: list[Any] = []
            if not buffered:
                readable, writable, _ = select.select(
                    [sock], [sock] if client.want_write() else [], [], min(remaining, 0.5)
                )
            rc = client.loop_read() if readable else MQTTErrorCode.MQTT_ERR_SUCCESS
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and writable:
                rc = client.loop_write()
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                rc = client.loop_misc()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        return self._first_error if self._first_done else "connection lost before CONNACK"

    # -- event loop -----------------------------------------------------------------------

    def _went_up(self) -> None:
        if self.pool.closed:
            return
        if not self.up:
            log.info("mqtt %s connected to %s", self.client_id, self.pool.address)
        self.up = True
        self.last_error = None
        self.pool.changed()

    def _went_down(self, reason: str) -> None:
        if self.up:
            log.warning("mqtt %s: %s", self.client_id, reason)
        self.up = False
        self.last_error = reason
        self.fail_pending(f"{self.client_id}: {reason} (before PUBACK)")
        self.pool.changed()

    def _acked(self, mid: int, refusal: str | None) -> None:
        future = self.pending.pop(mid, None)
        if future is None or future.done():
            return
        if refusal is None:
            future.set_result(None)
        else:
            future.set_exception(DeliveryError(f"publish refused: {refusal}"))

    def fail_pending(self, message: str) -> None:
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(DeliveryError(message))

    async def connect(self, host: str, port: int, keepalive_s: int, timeout_s: float) -> None:
        """The first connection, in a worker thread; no network thread yet (`run` starts
        it), so a pool that fails to start has nothing to stop."""
        self.loop = asyncio.get_running_loop()
        try:
            error = await asyncio.to_thread(
                self._first_connect, host, port, keepalive_s, timeout_s
            )
        except OSError as e:
            error = f"cannot connect: {_describe(e)}"
        if error is not None:
            self.last_error = error

    def run(self, host: str, port: int, keepalive_s: int) -> None:
        """Start the network thread: it keeps this connection up, reconnecting with backoff
        (right away if the first connection failed)."""
        if not self.up:
            self.client.disconnect()  # drop a half-open first attempt, if any
            self.client.connect_async(host, port, keepalive_s)
        self.client.loop_start()
        self.threaded = True

    def send(self, topic: str, payload: bytes, qos: int) -> tuple[int, asyncio.Future[None]]:
        """Hand one message to paho; returns its `mid` and a future resolved by its PUBACK
        (QoS 0: once written)."""
        try:
            info = self.client.publish(topic, payload, qos=qos)
        except ValueError as e:
            raise DeliveryError(f"invalid publish: {e}") from None
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise DeliveryError(f"{self.client_id}: {mqtt.error_string(info.rc)}")
        assert self.loop is not None
        future: asyncio.Future[None] = self.loop.create_future()
        self.pending[info.mid] = future
        return info.mid, future

    async def close(self) -> None:
        self.up = False
        self.fail_pending(f"{self.client_id}: closed before PUBACK")
        self.client.disconnect()
        if self.threaded:
            self.threaded = False
            await asyncio.to_thread(self.client.loop_stop)
        # closes the socket pair paho otherwise keeps until a garbage collection finalizes
        # it (in any order: "unclosed socket" warnings) and drops our callbacks
        self.client.reinitialise(self.client_id)


class MqttPool:
    """Publishes to an MQTT broker (AWS IoT Core) over TLS with an X.509 client certificate,
    over `connections` connections, each kept under `max_rate` publishes/s.

    The AWS IoT sink calls `start()`, then `publish()` concurrently, then `close()`.
    `monotonic` and `sleep` drive the rate limiters (tests inject a fake clock); timeouts use
    the event loop's clock."""

    def __init__(
        self, host: str, port: int = 8883, *,
        client_cert_pem: str, client_key_pem: str,
        ca_pem: str | None = None,
        client_id: str = "simwire", connections: int = 2,
        max_rate: float = 100.0,
        qos: int = 1, timeout_s: float = 20.0, keepalive_s: int = 60,
        alpn: bool = False,
        reconnect_max_delay_s: int = 30,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be >= 1")
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        if max_rate <= 0 or timeout_s <= 0:
            raise ValueError("max_rate and timeout_s must be > 0")
        self._host = host
        self._port = port
        self._cert_pem = client_cert_pem
        self._key_pem = client_key_pem
        self._ca_pem = ca_pem
        self._alpn = alpn
        self._qos = qos
        self._timeout_s = timeout_s
        self._keepalive_s = keepalive_s
        self._connections = [
            _Connection(self, f"{client_id}-{i}",
                        TokenBucket(max_rate, monotonic=monotonic, sleep=sleep))
            for i in range(connections)
        ]
        for conn in self._connections:
            conn.client.reconnect_delay_set(1, max(1, reconnect_max_delay_s))
            conn.client.connect_timeout = timeout_s
            conn.client.max_inflight_messages_set(MAX_IN_FLIGHT)
        self._any_up = asyncio.Event()
        self._next = 0
        self.closed = False

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def connected(self) -> int:
        """How many connections are up now."""
        return sum(conn.up for conn in self._connections)

    @property
    def in_flight(self) -> int:
        """Publishes sent and waiting for their PUBACK."""
        return sum(len(conn.pending) for conn in self._connections)

    def changed(self) -> None:
        """A connection went up or down (called by `_Connection` on the event loop)."""
        if self.closed or any(conn.up for conn in self._connections):
            self._any_up.set()  # when closed: wakes waiting publishes, which then raise
        else:
            self._any_up.clear()

    async def start(self) -> None:
        """Connect every connection; raises DeliveryError if none connects (the pool is
        closed then). Connections that failed keep retrying in the background."""
        try:
            context = await asyncio.to_thread(
                _ssl_context, self._cert_pem, self._key_pem, self._ca_pem, self._alpn
            )
        except DeliveryError:
            self.closed = True
            raise
        for conn in self._connections:
            conn.client.tls_set_context(context)
        await asyncio.gather(*(
            conn.connect(self._host, self._port, self._keepalive_s, self._timeout_s)
            for conn in self._connections
        ))
        # `_went_up`/`_went_down` posted by the workers ran before their to_thread returned
        if not any(conn.up for conn in self._connections):
            reason = self._last_error()
            await self.close()
            raise DeliveryError(f"MQTT broker {self.address}: {reason}")
        for conn in self._connections:
            conn.run(self._host, self._port, self._keepalive_s)

    def _last_error(self) -> str:
        errors = [conn.last_error for conn in self._connections if conn.last_error]
        return errors[0] if errors else "not connected"

    def _pick(self) -> _Connection | None:
        up = [conn for conn in self._connections if conn.up]
        if not up:
            return None
        self._next = (self._next + 1) % len(self._connections)
        start = self._next
        return min(
            up,
            key=lambda c: (
                c.bucket.delay(), len(c.pending),
                (self._connections.index(c) - start) % len(self._connections),
            ),
        )

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish one message; returns once the broker acknowledged it (QoS 1: PUBACK).

        Waits up to `timeout_s` for a connection and then up to `timeout_s` for the PUBACK;
        raises DeliveryError on timeout, disconnect or refusal."""
        if self.closed:
            raise DeliveryError("MQTT pool is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        while True:
            if self.closed:
                raise DeliveryError("MQTT pool is closed")
            conn = self._pick()
            if conn is None:
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(remaining):
                        await self._any_up.wait()
                except TimeoutError:
                    raise DeliveryError(
                        f"MQTT broker {self.address}: no connection within "
                        f"{self._timeout_s:g}s ({self._last_error()})"
                    ) from None
                continue
            await conn.bucket.acquire()
            if conn.up and not self.closed:
                break
        mid, future = conn.send(topic, payload, self._qos)
        try:
            async with asyncio.timeout(self._timeout_s):
                await future
        except TimeoutError:
            raise DeliveryError(
                f"MQTT broker {self.address}: no PUBACK within {self._timeout_s:g}s"
            ) from None
        finally:
            if conn.pending.get(mid) is future:
                del conn.pending[mid]

    async def close(self) -> None:
        """Disconnect every connection and stop their threads; publishes still waiting fail
        with DeliveryError. Takes up to a second while paho sleeps between reconnects."""
        self.closed = True
        await asyncio.gather(*(conn.close() for conn in self._connections))
        self.changed()


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when its handshake fails: paho drops such a socket unclosed."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _describe(error: OSError) -> str:
    if isinstance(error, ssl.SSLError):
        return f"TLS: {error.reason or error}"
    return error.strerror or str(error) or type(error).__name__


def _ssl_context(
    cert_pem: str, key_pem: str, ca_pem: str | None, alpn: bool
) -> ssl.SSLContext:
    """Client TLS context (run in a worker thread: reads files and the system trust store)."""
    try:
        context = (
            ssl.create_default_context(cadata=ca_pem)
            if ca_pem is not None
            else ssl.create_default_context()
        )
    except (ssl.SSLError, ValueError):
        raise DeliveryError("invalid CA certificate (PEM expected)") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _ClosingSSLSocket
    with tempfile.TemporaryDirectory(prefix="simwire-mqtt-") as directory:
        cert_path = Path(directory) / "cert.pem"
        key_path = Path(directory) / "key.pem"
        for path, text in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError:
            raise DeliveryError(
                "invalid client certificate or private key (PEM expected, matching pair)"
            ) from None
    if alpn:
        context.set_alpn_protocols([AWS_ALPN])
    return context
