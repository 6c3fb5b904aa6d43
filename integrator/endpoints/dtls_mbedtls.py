"""The python-mbedtls (Mbed TLS 2.28) DTLS backend of integrator.endpoints.dtls.

DTLS 1.2 only, PSK and ECDHE-PSK suites (`SUITES`, server preference: plain-PSK AEAD
first, which costs a battery-powered device least; 0x00AE for FreeRTOS; ECDHE-PSK and
CBC-SHA1 last). Encrypt-then-MAC and Extended Master Secret are Mbed TLS defaults; no
renegotiation, no session resumption, no certificates.

One `ServerContext` serves every peer, so Mbed TLS's stateless cookies (HMAC over the
peer's transport address with a per-process key, 60 s lifetime) verify across buffers:
`hello` runs a ClientHello through a spare buffer and keeps it only once the cookie is
valid. The context's PSK store is `_ExpectedPsk`: while a session is driven it holds that
session's (identity, key) and yields nothing for any other identity, so a peer can only
complete a handshake with the PSK its source IP is bound to.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import suppress
from typing import Any, Final, cast

from mbedtls import tls
from mbedtls.exceptions import TLSError

from integrator.endpoints.dtls import DtlsClosed, DtlsError

SUITES: Final[dict[str, tuple[str, int]]] = {
    # Mbed TLS name: (IANA name, IANA code), in server preference order.
    "TLS-PSK-WITH-AES-128-CCM-8": ("TLS_PSK_WITH_AES_128_CCM_8", 0xC0A8),
    "TLS-PSK-WITH-AES-128-GCM-SHA256": ("TLS_PSK_WITH_AES_128_GCM_SHA256", 0x00A8),
    "TLS-PSK-WITH-AES-128-CCM": ("TLS_PSK_WITH_AES_128_CCM", 0xC0A4),
    "TLS-PSK-WITH-AES-256-GCM-SHA384": ("TLS_PSK_WITH_AES_256_GCM_SHA384", 0x00A9),
    "TLS-PSK-WITH-AES-256-CCM": ("TLS_PSK_WITH_AES_256_CCM", 0xC0A5),
    "TLS-PSK-WITH-AES-256-CCM-8": ("TLS_PSK_WITH_AES_256_CCM_8", 0xC0A9),
    "TLS-PSK-WITH-CHACHA20-POLY1305-SHA256": ("TLS_PSK_WITH_CHACHA20_POLY1305_SHA256", 0xCCAB),
    "TLS-PSK-WITH-AES-128-CBC-SHA256": ("TLS_PSK_WITH_AES_128_CBC_SHA256", 0x00AE),
    "TLS-PSK-WITH-AES-256-CBC-SHA384": ("TLS_PSK_WITH_AES_256_CBC_SHA384", 0x00AF),
    "TLS-ECDHE-PSK-WITH-CHACHA20-POLY1305-SHA256": (
        "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256", 0xCCAC),
    "TLS-ECDHE-PSK-WITH-AES-128-CBC-SHA256": ("TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256", 0xC037),
    "TLS-ECDHE-PSK-WITH-AES-256-CBC-SHA384": ("TLS_ECDHE_PSK_WITH_AES_256_CBC_SHA384", 0xC038),
    "TLS-PSK-WITH-AES-128-CBC-SHA": ("TLS_PSK_WITH_AES_128_CBC_SHA", 0x008C),
    "TLS-PSK-WITH-AES-256-CBC-SHA": ("TLS_PSK_WITH_AES_256_CBC_SHA", 0x008D),
    "TLS-ECDHE-PSK-WITH-AES-128-CBC-SHA": ("TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA", 0xC035),
    "TLS-ECDHE-PSK-WITH-AES-256-CBC-SHA": ("TLS_ECDHE_PSK_WITH_AES_256_CBC_SHA", 0xC036),
}
_BEFORE_COOKIE: Final = frozenset({
    "HELLO_REQUEST", "CLIENT_HELLO", "SERVER_HELLO", "SERVER_HELLO_VERIFY_REQUEST_SENT",
})
"""Handshake steps (`HandshakeStep` names) up to the cookie check's outcome."""
_PEER_CLOSE_NOTIFY: Final = 0x7880  # MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY, as TLSError.err
_MAX_STEPS: Final = 64
"""Bound on handshake steps / records per datagram (a full PSK handshake takes ~20)."""
_MAX_RECORD: Final = 16 * 1024 + 256


class _ExpectedPsk(Mapping[str, bytes]):
    """The context's PSK store; Mbed TLS asks it for the identity in ClientKeyExchange."""

    __slots__ = ("identity", "key")

    def __init__(self) -> None:
        self.identity: str | None = None
        self.key = b""

    def __getitem__(self, identity: str) -> bytes:
        if self.identity is None or identity != self.identity:
            raise KeyError("unexpected PSK identity")  # -> alert unknown_psk_identity
        return self.key

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def datagrams(data: bytes, mtu: int) -> list[bytes]:
    """Splits concatenated DTLS records into datagrams of whole records, each at most `mtu`
    bytes unless a single record is larger (python-mbedtls's output loses the datagram
    boundaries Mbed TLS wrote)."""
    n = len(data)
    if n <= mtu:
        return [data] if n else []
    out: list[bytes] = []
    start = pos = 0
    while pos < n:
        end = n if pos + 13 > n else min(n, pos + 13 + int.from_bytes(data[pos + 11:pos + 13]))
        if end - start > mtu and pos > start:
            out.append(data[start:pos])
            start = pos
        pos = end
    if start < n:
        out.append(data[start:])
    return out


def _reason(exc: TLSError) -> str:
    return exc.msg or str(exc)


class MbedtlsBackend:
    """`DtlsBackend` on python-mbedtls; created by integrator.endpoints.dtls.serve."""

    def __init__(self, mtu: int = 1280, handshake_timeout_s: float = 30.0,
                 suites: tuple[str, ...] = tuple(SUITES)) -> None:
        self.keys = _ExpectedPsk()
        self.mtu = mtu
        self.readbuf = bytearray(_MAX_RECORD)
        available = set(tls.ciphers_available())
        self._ctx = tls.ServerContext(tls.DTLSConfiguration(
            ciphers=tuple(s for s in suites if s in available),
            lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
            highest_supported_version=tls.DTLSVersion.DTLSv1_2,
            validate_certificates=False,
            anti_replay=True,
            # The server never retransmits on its own timer (the client's retransmission
            # makes Mbed TLS resend its flight); the endpoint enforces the timeout.
            handshake_timeout_min=handshake_timeout_s,
            handshake_timeout_max=handshake_timeout_s,
            pre_shared_key_store=self.keys,
        ))
        self._spare: tls.TLSWrappedBuffer | None = None

    def hello(
        self, peer: bytes, datagram: bytes, identity: str, key: bytes,
    ) -> tuple[list[bytes], MbedtlsSession | None]:
        buf = self._spare or self._ctx.wrap_buffers()
        self._spare = None
        try:
            buf.setcookieparam(peer)
            buf.receive_from_network(datagram)
            for _ in range(_MAX_STEPS):
                try:
                    buf.do_handshake()
                except tls.WantWriteError:
                    continue  # the HelloVerifyRequest: the next step raises
                if buf._handshake_state.name not in _BEFORE_COOKIE:  # ServerHello written
                    return [], MbedtlsSession(self, buf, identity, key)
        except tls.HelloVerifyRequest:  # python-mbedtls has reset the buffer: reuse it
            out = _take_output(buf)
            if not len(buf._input_buffer):
                self._spare = buf
            return datagrams(out, self.mtu), None
        except (TLSError, ValueError):
            pass  # not a usable ClientHello: a stateless server answers nothing
        return [], None


class MbedtlsSession:
    """`DtlsSession` over one `TLSWrappedBuffer` (python-mbedtls's in-memory BIO)."""

    __slots__ = ("_backend", "_buf", "_established", "_identity", "_key", "_out")

    def __init__(self, backend: MbedtlsBackend, buf: tls.TLSWrappedBuffer, identity: str,
                 key: bytes) -> None:
        self._backend = backend
        self._buf = buf
        self._identity = identity
        self._key = key
        self._established = False
        self._out = bytearray()

    @property
    def established(self) -> bool:
        return self._established

    @property
    def cipher(self) -> str | None:
        name: object = self._buf.cipher()  # a str (the stub says bytes)
        if not isinstance(name, str):
            return None
        return SUITES.get(name, (name, 0))[0]

    def receive(self, datagram: bytes) -> list[bytes]:
        buf = self._buf
        if datagram:
            buf.receive_from_network(datagram)
        keys = self._backend.keys
        keys.identity, keys.key = self._identity, self._key
        try:
            if not self._established:
                self._handshake()
                if not self._established:
                    return []
            return self._read()
        except tls.RaggedEOF:
            raise DtlsClosed("connection closed") from None
        except TLSError as exc:
            if getattr(exc, "err", None) == _PEER_CLOSE_NOTIFY:
                raise DtlsClosed("close_notify") from None
            raise DtlsError(_reason(exc)) from None
        except ValueError as exc:
            raise DtlsError(str(exc)) from None
        finally:
            keys.identity, keys.key = None, b""
            self._out += _take_output(buf)
            if len(buf._input_buffer):  # never glue a partial datagram to the next one
                cast(Any, buf._input_buffer).clear()

    def _handshake(self) -> None:
        buf = self._buf
        for _ in range(_MAX_STEPS):
            try:
                buf.do_handshake()  # one step
            except tls.WantWriteError:
                self._out += _take_output(buf)
            except tls.WantReadError:
                if not len(buf._input_buffer):
                    return
            except ValueError:  # "handshake already over" (cheaper than reading the state)
                if buf._handshake_state.name != "HANDSHAKE_OVER":
                    raise
                self._established = True
                return
        raise DtlsError("handshake does not progress")

    def _read(self) -> list[bytes]:
        buf = self._buf
        view = self._backend.readbuf
        records: list[bytes] = []
        for _ in range(_MAX_STEPS):
            try:
                # The stub says bytes; the Cython signature takes any writable buffer.
                n = buf.readinto(cast(bytes, view), len(view))
            except tls.WantReadError:
                if not len(buf._input_buffer):
                    break
                continue
            except tls.WantWriteError:
                self._out += _take_output(buf)
                continue
            records.append(bytes(view[:n]))
        return records

    def send(self, plaintext: bytes) -> None:
        if not self._established:
            raise DtlsError("handshake not complete")
        try:
            self._buf.write(plaintext)
        except TLSError as exc:
            raise DtlsError(_reason(exc)) from None
        finally:
            self._out += _take_output(self._buf)

    def close(self) -> None:
        with suppress(Exception):  # best effort: the association may be dead already
            self._buf.shutdown()
        self._out += _take_output(self._buf)

    def outgoing(self) -> list[bytes]:
        if not self._out:
            return []
        out = datagrams(bytes(self._out), self._backend.mtu)
        self._out.clear()
        return out


def _take_output(buf: tls.TLSWrappedBuffer) -> bytes:
    n = len(buf._output_buffer)
    if not n:
        return b""
    data = buf.peek_outgoing(n)
    buf.consume_outgoing(n)
    return data
