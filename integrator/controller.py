"""Device Controller: downlinks to devices over UDP, CoAP and LwM2M (spec section 1.7).

Called by the actions API (create, bulk create, list, get, cancel) and by the pipeline
(`on_activity`: any uplink of a device fires its SEND_WHEN_ACTIVE requests; LwM2M
registrations and updates call it too). Requests are stored first (status SCHEDULED),
then sent by a per-protocol `Sender` in a task; their outcome is stored (SUCCEEDED /
FAILED with `errorMessage`). At most 10 requests wait per device; a waiting request
expires to FAILED after 24 h; records are deleted after 7 days (`run_forever`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from integrator import coap
from integrator.coap_client import CoapError, CoapRequests, CoapReset, CoapTimeout
from simwire.clock import Clock
from simwire.errors import Conflict, NotFound, Problems, Unprocessable
from simwire.model import (
    DAY_MS,
    ICCID_RE,
    DownlinkMode,
    DownlinkRequest,
    DownlinkStatus,
    Sim,
    iso_ms,
)
from simwire.model import Protocol as DeviceProtocol
from simwire.ports import DownlinkQuery, DownlinkRepository, Page, SimRepository
from simwire.tasks import every

log = logging.getLogger("simwire.integrator.controller")

MAX_SCHEDULED = 10
SCHEDULE_TTL_MS = DAY_MS
KEEP_MS = 7 * DAY_MS
MAX_BULK = 100
PAYLOAD_LIMITS = {DeviceProtocol.UDP: 508, DeviceProtocol.COAP: 1024}
COAP_PATH_RE = re.compile(r"^[a-zA-Z0-9\-._~%:/?#@!$&'()*+,;=]{0,255}$")
COAP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
LWM2M_ACTIONS = ("read", "write", "execute", "observe-start", "observe-end")
LWM2M_PATH_RE = re.compile(r"^(/\d{1,5}){1,4}$")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a sender reports for one attempt."""

    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None
    retry: bool = False
    """A failure worth another attempt (timeout), if attempts are left."""


class Sender(Protocol):
    """Sends one attempt of a request to the device (one per protocol)."""

    async def send(self, req: DownlinkRequest) -> Outcome: ...


class Controller:
    def __init__(self, repo: DownlinkRepository, sims: SimRepository, clock: Clock,
                 senders: dict[DeviceProtocol, Sender],
                 elsewhere: Callable[[Sim, DeviceProtocol], bool] | None = None,
                 hand_off: Callable[[Sim], None] | None = None) -> None:
        """`elsewhere(sim, protocol)`: another worker process must send this device's
        requests of `protocol` (it holds the device's LwM2M registration); such a SEND_NOW
        request is stored SCHEDULED and `hand_off(sim)` tells that process, which `fire`s
        it (a lost notice: the device's next activity fires it)."""
        self._repo = repo
        self._sims = sims
        self._clock = clock
        self._senders = senders
        self._elsewhere = elsewhere
        self._hand_off = hand_off
        self._tasks: set[asyncio.Task[None]] = set()
        self._firing: set[str] = set()
        self.waiting: set[str] = set()
        """ICCIDs with SEND_WHEN_ACTIVE requests waiting (this process's; `refresh` adds
        those created by other processes)."""

    # -- API -------------------------------------------------------------------------------

    async def create(self, iccid: str, protocol: str, body: Any, org: str) -> DownlinkRequest:
        """`POST /v1/integrate/devices/{iccid}/actions/{protocol}`."""
        proto = self._protocol(protocol)
        data = validate(proto, body)
        sim = await self._sim(iccid, org)
        req = await self._store(sim, proto, data)
        if req is None:
            raise Conflict(f"device {iccid} already has {MAX_SCHEDULED} scheduled requests")
        return req

    async def create_bulk(self, protocol: str, body: Any, org: str) -> dict[str, Any]:
        """`POST /v1/integrate/devices/actions/{protocol}` with `deviceIds` (1-100)."""
        proto = self._protocol(protocol)
        if not isinstance(body, dict):
            raise Unprocessable([{"property": "body", "message": "must be a JSON object"}])
        ids = body.get("deviceIds")
        if (not isinstance(ids, list) or not 1 <= len(ids) <= MAX_BULK
                or not all(isinstance(i, str) for i in ids)):
            raise Unprocessable([{"property": "deviceIds",
                                  "message": f"must be a list of 1 to {MAX_BULK} ICCIDs"}])
        data = validate(proto, {k: v for k, v in body.items() if k != "deviceIds"})
        accepted: list[dict[str, str]] = []
        rejected: list[dict[str, str]] = []
        for iccid in dict.fromkeys(ids):
            try:
                sim = await self._sim(iccid, org)
            except NotFound:
                rejected.append({"deviceId": iccid, "reason": "unknown device"})
                continue
            req = await self._store(sim, proto, data)
            if req is None:
                rejected.append({"deviceId": iccid,
                                 "reason": f"{MAX_SCHEDULED} requests already scheduled"})
            else:
                accepted.append({"deviceId": iccid, "requestId": req.id})
        return {"acceptedRequests": accepted, "rejectedDevices": rejected,
                "message": f"{len(accepted)} requests accepted"}

    async def get(self, request_id: str, org: str) -> DownlinkRequest:
        req = await self._repo.get_downlink(request_id)
        if req is None or req.org != org:
            raise NotFound(f"request {request_id} not found")
        return req

    async def list_requests(self, query: DownlinkQuery) -> Page[DownlinkRequest]:
        return await self._repo.list_downlinks(query)

    async def cancel(self, request_id: str, org: str) -> DownlinkRequest:
        """Only a request still waiting (SCHEDULED) can be cancelled."""
        req = await self.get(request_id, org)
        done = replace(req, status=DownlinkStatus.CANCELLED, updated_ms=self._clock.now_ms())
        if (req.status is not DownlinkStatus.SCHEDULED
                or not await self._repo.update_downlink(done, DownlinkStatus.SCHEDULED)):
            current = await self.get(request_id, org)
            raise Conflict(f"request {request_id} is {current.status.value}: only SCHEDULED "
                           "requests can be cancelled")
        return done

    # -- sending ---------------------------------------------------------------------------

    def on_activity(self, iccid: str) -> None:
        """Pipeline (after a committed uplink) and LwM2M register/update: fire the device's
        waiting requests. Hot path: a set lookup unless the device has waiting requests;
        one firing per device at a time."""
        if iccid not in self.waiting:
            return
        self.fire(iccid)

    def fire(self, iccid: str) -> None:
        """Send the device's waiting requests now (activity, or another worker's
        `hand_off`)."""
        if iccid in self._firing:
            return
        self.waiting.discard(iccid)
        self._firing.add(iccid)
        self._spawn(self._fire(iccid))

    async def _fire(self, iccid: str) -> None:
        try:
            for req in await self._repo.scheduled_downlinks(iccid):
                await self._deliver(req)
        except Exception:
            log.exception("firing scheduled requests of %s failed", iccid)
        finally:
            self._firing.discard(iccid)

    async def _store(self, sim: Sim, proto: DeviceProtocol, data: dict[str, Any]
                     ) -> DownlinkRequest | None:
        now = self._clock.now_ms()
        request_id = str(uuid.uuid4())
        mode = DownlinkMode(data.get("requestMode", DownlinkMode.SEND_NOW.value))
        attempts = int(data.get("sendAttempts", 1))
        request_data = {**data, "iccid": sim.iccid, "imsi1": sim.imsi, "deviceId": sim.iccid,
                        "requestId": request_id, "customerId": sim.org,
                        "deviceIpAddress": sim.ip}
        # SEND_NOW goes out at once (IN_PROGRESS: not counted against the waiting limit),
        # unless another worker process must send it
        remote = (mode is DownlinkMode.SEND_NOW and self._elsewhere is not None
                  and self._elsewhere(sim, proto))
        status = (DownlinkStatus.IN_PROGRESS if mode is DownlinkMode.SEND_NOW and not remote
                  else DownlinkStatus.SCHEDULED)
        req = DownlinkRequest(request_id, sim.org, sim.iccid, sim.ip, proto, mode, status,
                              request_data, attempts, attempts, now, now,
                              now + SCHEDULE_TTL_MS)
        if not await self._repo.create_downlink(req, MAX_SCHEDULED):
            return None
        if remote:
            if self._hand_off is not None:
                self._hand_off(sim)
        elif mode is DownlinkMode.SEND_NOW:
            self._spawn(self._deliver(req, claimed=True))
        else:
            self.waiting.add(sim.iccid)
        return req

    async def _deliver(self, req: DownlinkRequest, claimed: bool = False) -> None:
        """Send with up to `send_attempts` attempts; store every status change. A waiting
        request is claimed first (SCHEDULED -> IN_PROGRESS, compare-and-set): a cancel,
        an expiry or another process's firing wins or loses as a whole."""
        sender = self._senders.get(req.protocol)
        if not claimed:
            req = replace(req, status=DownlinkStatus.IN_PROGRESS,
                          updated_ms=self._clock.now_ms())
            if not await self._repo.update_downlink(req, DownlinkStatus.SCHEDULED):
                return
        outcome = Outcome(False, error=f"{req.protocol.value} downlinks are not available")
        while sender is not None and req.attempts_left > 0:
            req = replace(req, attempts_left=req.attempts_left - 1)
            try:
                outcome = await sender.send(req)
            except Exception as exc:
                log.exception("downlink %s failed", req.id)
                outcome = Outcome(False, error=f"internal error: {exc}")
            if outcome.ok or not outcome.retry:
                break
            await self._repo.update_downlink(replace(req, updated_ms=self._clock.now_ms()))
        final = replace(
            req, status=DownlinkStatus.SUCCEEDED if outcome.ok else DownlinkStatus.FAILED,
            result_data=outcome.result, error=None if outcome.ok else outcome.error,
            updated_ms=self._clock.now_ms())
        await self._repo.update_downlink(final)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def housekeeping(self) -> None:
        """Expire waiting requests after 24 h, delete records after 7 days, and learn
        which devices have waiting requests (also those created by other processes)."""
        now = self._clock.now_ms()
        await self._repo.expire_downlinks(now)
        await self._repo.purge_downlinks(now - KEEP_MS)
        self.waiting |= await self._repo.devices_with_scheduled()

    async def run_forever(self, interval_s: float = 10.0) -> None:
        """Background task (simwire.app): `housekeeping` every `interval_s`."""
        await every(interval_s, self.housekeeping,
                    lambda exc: log.exception("downlink housekeeping failed; retrying"))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- helpers ---------------------------------------------------------------------------

    def _protocol(self, raw: str) -> DeviceProtocol:
        if raw not in [p.value for p in DeviceProtocol]:
            raise NotFound(f"unknown protocol {raw}: UDP, COAP or LWM2M")
        proto = DeviceProtocol(raw)
        if proto not in self._senders:
            raise Unprocessable([{"property": "protocol", "message":
                                  f"{raw} downlinks are not available on this server"}])
        return proto

    async def _sim(self, iccid: str, org: str) -> Sim:
        sim = await self._sims.get(iccid) if ICCID_RE.match(iccid) else None
        if sim is None or sim.org != org:
            raise NotFound(f"device {iccid} not found")
        return sim


def validate(proto: DeviceProtocol, body: Any) -> dict[str, Any]:
    """An action body -> the normalised request data, or 422 listing every problem."""
    problems = Problems()
    if not isinstance(body, dict):
        raise Unprocessable([{"property": "body", "message": "must be a JSON object"}])
    common = {"requestMode"}
    allowed = {
        DeviceProtocol.UDP: {"payload", "payloadType", "port"},
        DeviceProtocol.COAP: {"payload", "payloadType", "port", "path", "requestType",
                              "sendAttempts"},
        DeviceProtocol.LWM2M: {"action", "resourceAddress", "data", "sendAttempts"},
    }[proto] | common
    for key in sorted(body.keys() - allowed):
        problems.add(key, "unknown property")
    out: dict[str, Any] = {}
    mode = body.get("requestMode", "SEND_NOW")
    if mode not in ("SEND_NOW", "SEND_WHEN_ACTIVE"):
        problems.add("requestMode", "must be SEND_NOW or SEND_WHEN_ACTIVE")
    out["requestMode"] = mode
    if "sendAttempts" in allowed:
        attempts = body.get("sendAttempts", 1)
        if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= 5:
            problems.add("sendAttempts", "must be an integer from 1 to 5")
        out["sendAttempts"] = attempts
    if proto in (DeviceProtocol.UDP, DeviceProtocol.COAP):
        port = body.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problems.add("port", "is required: 1 to 65535")
        out["port"] = port
        payload, ptype = body.get("payload", ""), body.get("payloadType", "STRING")
        if proto is DeviceProtocol.UDP and "payload" not in body:
            problems.add("payload", "is required")
        if ptype not in ("STRING", "BASE64"):
            problems.add("payloadType", "must be STRING or BASE64")
        elif not isinstance(payload, str):
            problems.add("payload", "must be a string")
        else:
            try:
                raw = payload_bytes(payload, ptype)
                if len(raw) > PAYLOAD_LIMITS[proto]:
                    problems.add("payload", f"at most {PAYLOAD_LIMITS[proto]} bytes for "
                                 f"{proto.value}")
            except ValueError:
                problems.add("payload", "is not valid base64")
        out["payload"], out["payloadType"] = payload, ptype
    if proto is DeviceProtocol.COAP:
        path, method = body.get("path"), body.get("requestType")
        if not isinstance(path, str) or not COAP_PATH_RE.match(path):
            problems.add("path", "is required: up to 255 URI characters, may hold ?query")
        if method not in COAP_METHODS:
            problems.add("requestType", "is required: " + ", ".join(COAP_METHODS))
        out["path"], out["requestType"] = path, method
    if proto is DeviceProtocol.LWM2M:
        action, address = body.get("action"), body.get("resourceAddress")
        if action not in LWM2M_ACTIONS:
            problems.add("action", "is required: " + ", ".join(LWM2M_ACTIONS))
        if not isinstance(address, str) or not LWM2M_PATH_RE.match(address):
            problems.add("resourceAddress", "is required: /object[/instance[/resource]]")
        out["action"], out["resourceAddress"] = action, address
        if "data" in body:
            out["data"] = body["data"]
        if action == "write" and "data" not in body:
            problems.add("data", "is required for write")
    problems.raise_any()
    return out


def payload_bytes(payload: str, payload_type: str) -> bytes:
    if payload_type == "BASE64":
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise ValueError("not base64") from exc
    return payload.encode()


def to_api(req: DownlinkRequest) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": req.id, "status": req.status.value, "deviceId": req.iccid, "ip": req.ip,
        "protocol": req.protocol.value, "created": iso_ms(req.created_ms),
        "updated": iso_ms(req.updated_ms), "mode": req.mode.value,
        "resultData": req.result_data, "requestData": req.request_data,
        "sendAttemptsLeft": req.attempts_left, "sendAttempts": req.send_attempts,
    }
    if req.error is not None:
        out["errorMessage"] = req.error
    return out


class UdpSender:
    """UDP downlinks: the payload as one datagram to `deviceIp:port`, from the
    controller's own socket; success = sent (UDP has no acknowledgement)."""

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport

    async def send(self, req: DownlinkRequest) -> Outcome:
        data = req.request_data
        self._transport.sendto(payload_bytes(data["payload"], data["payloadType"]),
                               (req.ip, int(data["port"])))
        return Outcome(True, {"message": "sent"})


_METHOD_CODES = {"GET": coap.GET, "POST": coap.POST, "PUT": coap.PUT, "DELETE": coap.DELETE,
                 "PATCH": 7}


class _DownlinkSocket(asyncio.DatagramProtocol):
    """The controller's own UDP socket: devices answer CoAP downlinks to it (1NCE: "to the
    source IP of the downlink, not to the ingest server")."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.transport: asyncio.DatagramTransport | None = None
        self.requests: CoapRequests | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        udp: asyncio.DatagramTransport = transport  # type: ignore[assignment]
        self.transport = udp
        self.requests = CoapRequests(lambda data, addr: udp.sendto(data, addr), self._clock)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = coap.parse(data)
        except coap.MalformedMessage:
            return
        if not msg.is_request and self.requests is not None:
            self.requests.handle(msg, (addr[0], addr[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.requests is not None:
            self.requests.close()


class DownlinkSockets:
    """The UDP and CoAP senders on one socket of the controller's own."""

    def __init__(self, transport: asyncio.DatagramTransport, proto: _DownlinkSocket) -> None:
        self.transport = transport
        self.udp = UdpSender(transport)
        assert proto.requests is not None
        self.coap = CoapSender(proto.requests)

    @classmethod
    async def open(cls, host: str, clock: Clock) -> DownlinkSockets:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _DownlinkSocket(clock), local_addr=(host, 0))
        return cls(transport, proto)

    def close(self) -> None:
        self.transport.close()


class CoapSender:
    """CoAP downlinks (no DTLS, as 1NCE): a CON request with RFC 7252 retransmissions; the
    device's 2.xx is success, 4.xx/5.xx failure; no answer (62-93 s) is a failed attempt
    that `sendAttempts` may repeat."""

    def __init__(self, requests: CoapRequests) -> None:
        self._requests = requests

    async def send(self, req: DownlinkRequest) -> Outcome:
        data = req.request_data
        path, _, query = str(data["path"]).partition("?")
        options: list[tuple[int, bytes]] = [
            (coap.OPT_URI_PATH, seg.encode()) for seg in path.strip("/").split("/") if seg]
        payload = payload_bytes(data.get("payload", ""), data.get("payloadType", "STRING"))
        if payload:
            options.append((coap.OPT_CONTENT_FORMAT,
                            b"" if data.get("payloadType", "STRING") == "STRING" else b"\x2a"))
        options += [(coap.OPT_URI_QUERY, q.encode()) for q in query.split("&") if q]
        try:
            res = await self._requests.request((req.ip, int(data["port"])),
                                               _METHOD_CODES[data["requestType"]],
                                               sorted(options, key=lambda o: o[0]), payload)
        except CoapError as exc:
            return coap_failure(exc)
        result = {"code": result_code(res.code), **_result_payload(res)}
        if res.code >> 5 == 2:
            return Outcome(True, result)
        return Outcome(False, result, f"the device answered {coap.code_str(res.code)}")


def coap_failure(exc: CoapError) -> Outcome:
    """A CoAP downlink without an answer (CoAP and LwM2M senders): no answer or not sent is
    a failed attempt `sendAttempts` may repeat; an RST is final."""
    if isinstance(exc, CoapTimeout):
        return Outcome(False, error="no answer from the device", retry=True)
    if isinstance(exc, CoapReset):
        return Outcome(False, error="the device reset the request (RST)")
    return Outcome(False, error=f"not sent: {exc}", retry=True)


def result_code(code: int) -> str:
    """A CoAP response code as 1NCE's `resultData.code` writes it: 2.05 -> "205"."""
    return f"{code >> 5}{code & 31:02d}"


def _result_payload(res: coap.Message) -> dict[str, str]:
    """TEXT when the response says its format and is printable UTF-8, else BASE64."""
    has_format = any(n == coap.OPT_CONTENT_FORMAT for n, _ in res.options)
    try:
        text = res.payload.decode()
        if has_format and text.isprintable():
            return {"payload": text, "payloadType": "TEXT"}
    except UnicodeDecodeError:
        pass
    return {"payload": base64.b64encode(res.payload).decode(), "payloadType": "BASE64"}
