"""An LwM2M 1.1 client for Simwire, written with aiocoap (`pip install aiocoap`; the payload
formats come from the simwire package, `integrator.lwm2m.formats`).

    python -m sdk_examples.lwm2m_client --server 127.0.0.1:5683 --endpoint 8988280666000000011 \\
        --bind 0.0.0.0:56830 --lifetime 300 --send-every 60 [--bootstrap 127.0.0.1:5683]

Like the 1NCE blueprints (Wakaama, Zephyr): endpoint name = ICCID, objects 1 (Server),
3 (Device), 4 (Connectivity Monitoring) and 6 (Location); registers on `/rd` (2.01 with
Location-Path `rd/<id>`), updates before the lifetime runs out, sends `/3/0` (and `/6/0`)
with the Send operation (`POST /dp`, SenML JSON) and answers the server's requests on the
same socket: Read (OMA-TLV, SenML JSON/CBOR, OMA-JSON or text/plain by the Accept option),
Discover, Write (replace and partial update), Write-Attributes, Execute, Create, Delete and
Observe (notifications when a value changes through `set`).

With `--bootstrap` (`Lwm2mClient.bootstrap`) it first asks the bootstrap server
(`POST /bs?ep=<ICCID>`), applies its Bootstrap-Delete and Bootstrap-Write requests to
objects 0 (Security) and 1 (Server) until Bootstrap-Finish, then registers with the server
that Security /0/x names (the instance that is not the bootstrap account) and the lifetime
Server /1/x/1 says. Over plain CoAP only: aiocoap's client DTLS needs tinydtls; the tests
drive DTLS bootstraps with an mbedtls client. Object 0 is never part of the registration.

The root link advertises the preferred content format (`</>;rt="oma.lwm2m";ct=110`); a
client created with `content_format=None` advertises none, so the server uses OMA-TLV.
The class keeps what the server did (`requests`, `executed`, `attributes`) for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiocoap
import aiocoap.resource as resource

from integrator.lwm2m.formats import (
    ContentFormat,
    FormatError,
    Link,
    Record,
    Value,
    decode,
    encode,
    format_links,
    parse_path,
)
from integrator.lwm2m.objects import Registry

log = logging.getLogger("sdk_examples.lwm2m_client")
SECURITY, SERVER = 0, 1


def default_values(ip: str = "10.0.0.1") -> dict[str, Value]:
    """Objects 1, 3, 4 and 6 with plausible values (one instance each)."""
    now = int(time.time())
    return {
        "/1/0/0": 1111, "/1/0/1": 300, "/1/0/2": 1, "/1/0/6": False, "/1/0/7": "U",
        "/3/0/0": "Simwire", "/3/0/1": "lwm2m-example", "/3/0/2": "0001",
        "/3/0/3": "1.0.0", "/3/0/6/0": 1, "/3/0/7/0": 3800, "/3/0/9": 77,
        "/3/0/10": 512, "/3/0/11/0": 0, "/3/0/13": now, "/3/0/16": "U",
        "/3/0/17": "example", "/3/0/18": "1.0", "/3/0/19": "1.0.0",
        "/4/0/0": 6, "/4/0/1/0": 6, "/4/0/2": -90, "/4/0/3": 0, "/4/0/4/0": ip,
        "/4/0/7/0": "iot.1nce.net", "/4/0/8": 21234, "/4/0/9": 1, "/4/0/10": 262,
        "/6/0/0": 52.52, "/6/0/1": 13.405, "/6/0/2": 34.0, "/6/0/5": now,
    }


class _Tree(resource.ObservableResource, resource.PathCapable):  # type: ignore[misc]
    """The client's whole object tree as one aiocoap resource (it parses the Uri-Path)."""

    def __init__(self, client: Lwm2mClient) -> None:
        super().__init__()
        self._client = client
        self._observers: dict[str, set[Any]] = {}

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def add_observation(self, request: Any, serverobservation: Any) -> None:
        if request.code != aiocoap.GET:
            return
        path = "/" + "/".join(request.opt.uri_path)
        if not self._client.records(path):
            return
        observers = self._observers.setdefault(path, set())
        observers.add(serverobservation)
        self._client.observed.add(path)

        def cancelled() -> None:
            observers.discard(serverobservation)
            if not observers:
                self._client.observed.discard(path)

        serverobservation.accept(cancelled)

    def changed(self, path: str) -> None:
        """Notify the observers of `path` and of the paths above it."""
        for observed, observers in list(self._observers.items()):
            if path == observed or path.startswith(observed + "/"):
                for obs in list(observers):
                    obs.trigger()

    async def render(self, request: Any) -> Any:
        return self._client.handle(request)


class Lwm2mClient:
    """One LwM2M client (see the module docstring)."""

    def __init__(
        self, endpoint: str, server: tuple[str, int], *, bind: tuple[str, int] = ("127.0.0.1", 0),
        lifetime: int = 300, version: str = "1.1", binding: str = "U", queue: bool = False,
        content_format: int | None = ContentFormat.SENML_JSON,
        values: Mapping[str, Value] | None = None, registry: Registry | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.server = server
        self.bind = bind
        self.lifetime = lifetime
        self.version = version
        self.binding = binding
        self.queue = queue
        self.content_format = content_format
        self.registry = registry or Registry.default()
        self.values: dict[str, Value] = dict(values if values is not None else
                                             default_values(bind[0]))
        self.location: tuple[str, ...] | None = None
        """The registration's Location-Path (`("rd", "<id>")`) once registered."""
        self.requests: list[tuple[str, str]] = []
        """(method, path) of every request the server made, oldest first."""
        self.executed: list[tuple[str, str]] = []
        """(path, arguments) of every Execute."""
        self.attributes: dict[str, dict[str, str | None]] = {}
        """Write-Attributes per path."""
        self.observed: set[str] = set()
        """Paths the server observes."""
        self._tree = _Tree(self)
        self._context: Any = None
        self._finished: asyncio.Future[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket: requests go out from it and the server's arrive on it."""
        self._context = await aiocoap.Context.create_server_context(
            self._tree, bind=self.bind, transports=["udp6"])

    async def close(self) -> None:
        if self._context is not None:
            await self._context.shutdown()
            self._context = None

    async def __aenter__(self) -> Lwm2mClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- registration interface ------------------------------------------------------------

    def links(self) -> str:
        """The registration payload: the root link, then each object instance."""
        root: dict[str, str | None] = {"rt": "oma.lwm2m"}
        if self.content_format is not None:
            root["ct"] = str(int(self.content_format))
        out = [Link("/", root)]
        seen: set[str] = set()
        for path in self.values:
            ids = parse_path(path)
            if ids[0] == SECURITY:
                continue  # never registered (OMA Core 6.2.1)
            instance = f"/{ids[0]}/{ids[1]}"
            if instance not in seen:
                seen.add(instance)
                out.append(Link(instance))
        return format_links(out)

    async def bootstrap(self, server: tuple[str, int], *, wait_s: float = 30.0,
                        **query: str | None) -> str:
        """Client-initiated bootstrap from the bootstrap server at `server` (module
        docstring); returns the Bootstrap-Request's code ("2.04"; anything else: nothing
        was changed). Raises TimeoutError without a Bootstrap-Finish within `wait_s`."""
        params: dict[str, str | None] = {"ep": self.endpoint}
        if self.content_format is not None:
            params["pct"] = str(int(self.content_format))
        params.update(query)
        self._finished = asyncio.get_running_loop().create_future()
        try:
            res = await self._request(aiocoap.POST, ("bs",), _query(params), to=server)
            if res.code != aiocoap.CHANGED:
                return str(res.code.dotted)
            async with asyncio.timeout(wait_s):
                await self._finished
        finally:
            self._finished = None
        account = self.server_account()
        if account is not None:
            uri = urlsplit(str(account.get("0")))
            self.server = (str(uri.hostname), int(uri.port or 5683))
        lifetime = next((v for p, v in self.values.items()
                         if parse_path(p)[0] == SERVER and parse_path(p)[2:] == (1,)), None)
        if isinstance(lifetime, int):
            self.lifetime = lifetime
        return str(res.code.dotted)

    def server_account(self) -> dict[str, Value] | None:
        """The Security instance of the LwM2M server (Bootstrap-Server false), by resource
        ID (`{"0": uri, "2": mode, "3": identity, "5": key, "10": short server ID}`)."""
        instances = {parse_path(p)[1] for p in self.values if parse_path(p)[0] == SECURITY}
        for n in sorted(instances):
            if self.values.get(f"/0/{n}/1") is False:
                return {r.path.rsplit("/", 1)[1]: r.value for r in self.records(f"/0/{n}")}
        return None

    async def register(self, **query: str | None) -> str:
        """`POST /rd?ep=..&lt=..&lwm2m=..&b=..`; returns the code ("2.01"). Extra query
        parameters override or add (None: leave one out)."""
        params: dict[str, str | None] = {
            "ep": self.endpoint, "lt": str(self.lifetime), "lwm2m": self.version,
            "b": self.binding}
        params.update(query)
        if self.queue:
            params.setdefault("Q", "")
        res = await self._request(aiocoap.POST, ("rd",), _query(params),
                                  self.links().encode(), ContentFormat.LINK_FORMAT)
        if res.code == aiocoap.CREATED:
            self.location = tuple(res.opt.location_path)
        return str(res.code.dotted)

    async def update(self, *, lifetime: int | None = None, links: bool = False) -> str:
        """`POST /rd/<id>` (returns "2.04"); optionally a new lifetime and the links."""
        assert self.location is not None, "not registered"
        params: dict[str, str | None] = {}
        if lifetime is not None:
            self.lifetime = lifetime
            params["lt"] = str(lifetime)
        payload = self.links().encode() if links else b""
        res = await self._request(aiocoap.POST, self.location, _query(params), payload,
                                  ContentFormat.LINK_FORMAT if links else None)
        return str(res.code.dotted)

    async def deregister(self) -> str:
        """`DELETE /rd/<id>` (returns "2.02")."""
        assert self.location is not None, "not registered"
        res = await self._request(aiocoap.DELETE, self.location)
        if res.code == aiocoap.DELETED:
            self.location = None
        return str(res.code.dotted)

    async def send(self, paths: Iterable[str] = ("/3/0",),
                   content_format: int = ContentFormat.SENML_JSON) -> str:
        """The Send operation: `POST /dp` with the values under `paths` (returns "2.04")."""
        records = [r for p in paths for r in self.records(p)]
        payload = encode(content_format, records, "/", self.registry)
        res = await self._request(aiocoap.POST, ("dp",), (), payload, content_format)
        return str(res.code.dotted)

    def set(self, path: str, value: Value) -> None:
        """Change a value; observers of it (or of its instance/object) are notified."""
        self.values[path] = value
        self._tree.changed(path)

    def records(self, path: str) -> list[Record]:
        """The values at or below `path`."""
        prefix = path.rstrip("/")
        return [Record(p, v) for p, v in self.values.items()
                if p == prefix or p.startswith(prefix + "/")]

    async def _request(self, code: Any, path: Iterable[str], query: Iterable[str] = (),
                       payload: bytes = b"", content_format: int | None = None,
                       to: tuple[str, int] | None = None) -> Any:
        assert self._context is not None, "start() first"
        host, port = to or self.server
        msg = aiocoap.Message(code=code, payload=payload, uri=f"coap://{host}:{port}")
        msg.opt.uri_path = tuple(path)
        msg.opt.uri_query = tuple(query)
        if content_format is not None:
            msg.opt.content_format = int(content_format)
        return await self._context.request(msg).response

    # -- the server's requests -------------------------------------------------------------

    def handle(self, request: Any) -> Any:
        """Answer one request of the server (aiocoap renders it here)."""
        segments = tuple(request.opt.uri_path)
        path = "/" + "/".join(segments)
        method = str(request.code)
        self.requests.append((method, path))
        if segments == ("bs",) and request.code == aiocoap.POST:
            return self._bootstrap_finish()
        if self._finished is not None and request.code == aiocoap.DELETE \
                and segments in (("0",), ("1",)):
            return self._bootstrap_delete(int(segments[0]))
        try:
            ids = parse_path(path)
        except FormatError:
            return aiocoap.Message(code=aiocoap.NOT_FOUND)
        try:
            if request.code == aiocoap.GET:
                return self._read(path, request.opt.accept)
            if request.code == aiocoap.PUT:
                if not request.payload:
                    return self._write_attributes(path, request.opt.uri_query)
                return self._write(path, request)
            if request.code == aiocoap.POST:
                if len(ids) == 1:
                    return self._create(path, request)
                if len(ids) == 3:
                    self.executed.append((path, request.payload.decode("utf-8", "replace")))
                    return aiocoap.Message(code=aiocoap.CHANGED)
                return self._write(path, request)
            if request.code == aiocoap.DELETE:
                return self._delete(path)
        except FormatError as exc:
            return aiocoap.Message(code=aiocoap.BAD_REQUEST, payload=str(exc).encode())
        return aiocoap.Message(code=aiocoap.METHOD_NOT_ALLOWED)

    def _read(self, path: str, accept: Any) -> Any:
        if accept is not None and int(accept) == ContentFormat.LINK_FORMAT:
            return self._discover(path)
        records = self.records(path)
        if not records:
            return aiocoap.Message(code=aiocoap.NOT_FOUND)
        fmt = int(accept) if accept is not None else int(
            self.content_format or ContentFormat.TLV)
        try:
            payload = encode(fmt, records, path, self.registry)
        except FormatError:
            return aiocoap.Message(code=aiocoap.NOT_ACCEPTABLE)
        return aiocoap.Message(code=aiocoap.CONTENT, payload=payload, content_format=fmt)

    def _discover(self, path: str) -> Any:
        records = self.records(path)
        if not records:
            return aiocoap.Message(code=aiocoap.NOT_FOUND)
        depth = len(parse_path(path))
        links: dict[str, Link] = {path: Link(path, dict(self.attributes.get(path, {})))}
        for record in records:
            ids = parse_path(record.path)
            for n in range(depth + 1, min(len(ids), 3) + 1):
                sub = "/" + "/".join(map(str, ids[:n]))
                links.setdefault(sub, Link(sub, dict(self.attributes.get(sub, {}))))
        return aiocoap.Message(code=aiocoap.CONTENT, payload=format_links(links.values()).encode(),
                               content_format=int(ContentFormat.LINK_FORMAT))

    def _write(self, path: str, request: Any) -> Any:
        fmt = request.opt.content_format
        if fmt is None:
            return aiocoap.Message(code=aiocoap.BAD_REQUEST)
        records = decode(int(fmt), request.payload, path, self.registry)
        if not records:
            return aiocoap.Message(code=aiocoap.BAD_REQUEST)
        for record in records:
            self.set(record.path, record.value)
        return aiocoap.Message(code=aiocoap.CHANGED)

    def _write_attributes(self, path: str, query: Iterable[str]) -> Any:
        attrs = self.attributes.setdefault(path, {})
        for item in query:
            name, eq, value = item.partition("=")
            attrs[name] = value if eq else None
        return aiocoap.Message(code=aiocoap.CHANGED)

    def _create(self, path: str, request: Any) -> Any:
        fmt = request.opt.content_format
        if fmt is None:
            return aiocoap.Message(code=aiocoap.BAD_REQUEST)
        records = decode(int(fmt), request.payload, path, self.registry)
        instances = {parse_path(r.path)[1] for r in records}
        if len(instances) != 1:
            return aiocoap.Message(code=aiocoap.BAD_REQUEST)
        instance = instances.pop()
        if self.records(f"{path}/{instance}"):
            return aiocoap.Message(code=aiocoap.BAD_REQUEST)
        for record in records:
            self.values[record.path] = record.value
        res = aiocoap.Message(code=aiocoap.CREATED)
        res.opt.location_path = (path.strip("/"), str(instance))
        return res

    def _bootstrap_finish(self) -> Any:
        if self._finished is None:
            return aiocoap.Message(code=aiocoap.METHOD_NOT_ALLOWED)
        if not self._finished.done():
            self._finished.set_result(None)
        return aiocoap.Message(code=aiocoap.CHANGED)

    def _bootstrap_delete(self, obj: int) -> Any:
        """Bootstrap-Delete of object 0 or 1: every instance but the bootstrap account."""
        keep = {parse_path(p)[1] for p, v in self.values.items()
                if obj == SECURITY and parse_path(p)[:3:2] == (SECURITY, 1) and v is True}
        for path in [p for p in self.values if parse_path(p)[0] == obj]:
            if parse_path(path)[1] not in keep:
                del self.values[path]
        return aiocoap.Message(code=aiocoap.DELETED)

    def _delete(self, path: str) -> Any:
        records = self.records(path)
        if not records or len(parse_path(path)) != 2:
            return aiocoap.Message(code=aiocoap.NOT_FOUND if not records
                                   else aiocoap.METHOD_NOT_ALLOWED)
        for record in records:
            del self.values[record.path]
        return aiocoap.Message(code=aiocoap.DELETED)


def _query(params: Mapping[str, str | None]) -> list[str]:
    """`{"ep": "x", "Q": ""}` -> ["ep=x", "Q"] (None leaves a parameter out)."""
    return [name if value == "" else f"{name}={value}"
            for name, value in params.items() if value is not None]


async def run(endpoint: str, server: tuple[str, int], bind: tuple[str, int], lifetime: int,
              send_every: float, bootstrap: tuple[str, int] | None = None) -> None:
    """Bootstrap (if asked), register, then update at 3/4 of the lifetime and Send /3/0
    every `send_every` s."""
    async with Lwm2mClient(endpoint, server, bind=bind, lifetime=lifetime) as client:
        if bootstrap is not None:
            code = await client.bootstrap(bootstrap)
            print("bootstrap:", code, f"server {client.server[0]}:{client.server[1]}")
        print("register:", await client.register(), "/".join(client.location or ()))
        loop = asyncio.get_running_loop()
        next_update = loop.time() + lifetime * 0.75
        try:
            while True:
                await asyncio.sleep(send_every)
                client.set("/3/0/13", int(time.time()))
                print("send:", await client.send(("/3/0", "/6/0")))
                if loop.time() >= next_update:
                    print("update:", await client.update())
                    next_update = loop.time() + lifetime * 0.75
        finally:
            with contextlib.suppress(Exception):
                print("deregister:", await client.deregister())


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="127.0.0.1:5683", help="host:port of Simwire's CoAP")
    ap.add_argument("--endpoint", required=True, help="the endpoint name: the SIM's ICCID")
    ap.add_argument("--bind", default="0.0.0.0:56830", help="local address:port")
    ap.add_argument("--lifetime", type=int, default=300)
    ap.add_argument("--send-every", type=float, default=60.0)
    ap.add_argument("--bootstrap", help="host:port of the bootstrap server (plain CoAP): "
                                        "bootstrap first, then use the server it writes")
    a = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(a.endpoint, _addr(a.server), _addr(a.bind), a.lifetime, a.send_every,
                        _addr(a.bootstrap) if a.bootstrap else None))


if __name__ == "__main__":
    main()
