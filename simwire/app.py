"""Composition root: the only module that imports every service.

`Simwire.start()` opens the store, builds the pipeline, starts the device endpoints, the
API and the background tasks, in that order, inside one AsyncExitStack; `stop()` unwinds it:
stop accepting (endpoints close and drain in-flight uplinks) -> stop background tasks ->
close the API -> close the store.

In a worker of `simwire serve --workers N` (simwire.workers) it takes the supervisor's
sockets instead of binding, holds only the LwM2M registrations of the devices whose
datagrams reach it, hands LwM2M downlinks to the worker that holds them, and tells cache
changes to the other workers. Only worker 0 may lead.

The leader (simwire.leadership: the holder of the store's lease, among the processes
allowed to lead) delivers the outbox, runs retention and ends interrupted PSK jobs; when
it dies another process takes over by itself.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from authenticator import api as sims_api
from authenticator.lookup import SimLookup
from authenticator.management import SimManagement
from authenticator.psk import JOB_SWEEP_S, Bootstrap, DtlsKeys, KeyRole, PskService, SecretBox
from energy_saver import api as templates_api
from energy_saver.service import SAVINGS_KEEP_DAYS, Templates
from energy_saver.translator import CodecCache, TemplateTranslator
from inspector import api as inspector_api
from inspector.adminlog import AdminLogWriter
from inspector.retention import Retention
from integrator import controller_api
from integrator.controller import Controller, DownlinkSockets
from integrator.endpoints import coap as coap_endpoint
from integrator.endpoints import dtls as dtls_endpoint
from integrator.endpoints import udp as udp_endpoint
from integrator.endpoints.datagram import BindUdp, bind_udp
from integrator.forwarders import api as integrations_api
from integrator.forwarders.dispatcher import Dispatcher, ForwarderConfig
from integrator.forwarders.service import Integrations, Limits
from integrator.forwarders.sinks import SinkFactory, SinkSettings
from integrator.lwm2m.bootstrap import ROUTE as BS_ROUTE
from integrator.lwm2m.bootstrap import BootstrapServer, Uris
from integrator.lwm2m.server import Lwm2mSender, Lwm2mServer
from integrator.pipeline import Pipeline
from locator import NoLocator
from simwire import clients as clients_api
from simwire.auth import TokenService
from simwire.clock import Clock, SystemClock
from simwire.config import Config
from simwire.http import build_api
from simwire.leadership import Leadership
from simwire.metrics import Metrics, SharedMetrics
from simwire.model import LogCategory, LogType, Protocol, Sim
from simwire.ports import Store, Translator
from simwire.storage import open_store
from simwire.tasks import cancel, every
from simwire.workers import WorkerContext, describe_ports, owner_index

log = logging.getLogger("simwire.app")


@dataclass(frozen=True, slots=True)
class BoundPorts:
    udp: int
    coap: int
    http: int
    coaps: int
    lwm2m: int
    """The LwM2M server's plain port (the CoAP port unless it has its own)."""
    lwm2m_coaps: int
    lwm2m_bootstrap: int
    lwm2m_bootstrap_coaps: int

    def describe(self) -> str:
        """`udp=4445 coap=5683 coaps=5684`, then the LwM2M ports that are their own."""
        return describe_ports({
            "udp_port": self.udp, "coap_port": self.coap, "coaps_port": self.coaps,
            "lwm2m_port": self.lwm2m, "lwm2m_coaps_port": self.lwm2m_coaps,
            "lwm2m_bootstrap_port": self.lwm2m_bootstrap,
            "lwm2m_bootstrap_coaps_port": self.lwm2m_bootstrap_coaps})


@dataclass(frozen=True, slots=True)
class CoapPort:
    """One bound CoAP endpoint: its handler, port and, behind DTLS, its key lookup."""

    protocol: coap_endpoint.CoapServerProtocol
    port: int
    keys: DtlsKeys | None


class Simwire:
    """One running Simwire process (or, in tests, one in-process instance)."""

    def __init__(
        self, config: Config, clock: Clock | None = None, translator: Translator | None = None,
        worker: WorkerContext | None = None,
    ) -> None:
        self.config = config
        self.worker = worker
        """Set in a worker process of `--workers N`."""
        self._bind_udp: BindUdp = bind_udp if worker is None else worker.bind_udp
        """How endpoints get their sockets: bound here, or inherited from the supervisor."""
        self.clock: Clock = clock or SystemClock()
        self.metrics = Metrics()
        self._translator = translator
        self._stack = AsyncExitStack()
        self.store: Store
        self.pipeline: Pipeline
        self.sims: SimManagement
        self.retention: Retention
        self.admin_logs: AdminLogWriter
        self.dispatcher: Dispatcher
        self.translator: TemplateTranslator
        self.psks: PskService
        self._lookup: SimLookup
        self.controller: Controller
        self.lwm2m: Lwm2mServer
        self.lwm2m_bootstrap: BootstrapServer
        self.ports: BoundPorts
        self.http_app: web.Application
        self.generated_admin: tuple[str, str] | None = None
        self.leadership: Leadership | None = None
        """Set when this process may lead (`Config.leader`, worker 0)."""
        self._duties: list[asyncio.Task[None]] = []
        """The leader's background tasks, while this process leads."""

    async def start(self) -> None:
        cfg = self.config
        stack = self._stack
        try:
            self.store = await open_store(
                cfg.store, cfg.data_dir, cfg.sqlite_synchronous, cfg.retention_days
            )
            stack.push_async_callback(self.store.close)

            tokens = await TokenService.create(self.store, self.clock)
            self.generated_admin = await tokens.ensure_admin(
                os.environ.get("SIMWIRE_ADMIN_CLIENT_ID"),
                os.environ.get("SIMWIRE_ADMIN_CLIENT_SECRET"),
            )

            codecs = CodecCache()
            self.translator = TemplateTranslator(self.store, self.metrics, codecs,
                                                 cfg.template_refresh_s)
            await self.translator.refresh()
            templates = Templates(self.store, self.translator, codecs, self.clock)

            lookup = SimLookup(self.store, self.clock, ttl_s=cfg.sim_cache_ttl_s)
            self._lookup = lookup
            self.sims = SimManagement(self.store, lookup, self.clock)
            self.admin_logs = AdminLogWriter(self.store, self.clock, self.metrics)
            self.admin_logs.start()
            stack.push_async_callback(self.admin_logs.stop)
            box = SecretBox.from_file(cfg.psk_key_file or cfg.data_dir / "psk-seal.key")
            self.psks = PskService(self.store, self.store, lookup, box, self.clock)
            stack.push_async_callback(self.psks.stop)
            bootstrap = Bootstrap(self.psks, lookup, self.admin_logs, cfg.coaps_url)
            self.retention = Retention(
                self.store, self.clock, self.metrics, cfg.retention_days, cfg.purge_interval_s,
                savings=self.store, savings_days=SAVINGS_KEEP_DAYS,
            )
            # LwM2M server (/rd, /dp on the CoAP ports; routes attached once they are bound):
            # registrations restored here; it reaches the pipeline and the controller built
            # below through late-bound callables
            self.lwm2m = Lwm2mServer(
                self.store, self.store, lookup,
                lambda raw, done: self.pipeline.submit(raw, done), self.clock,
                # LWM2M_PASSIVE_REPORTING: a `Config.lwm2m_passive_reporting` flag once added
                passive_reporting=cfg.lwm2m_passive_reporting,
                on_activity=lambda iccid: self.controller.on_activity(iccid),
                positions=NoLocator(), admin_logs=self.admin_logs,
                owns=None if self.worker is None else self.worker.owns)
            await self.lwm2m.start()
            stack.push_async_callback(self.lwm2m.stop)
            downlinks = await DownlinkSockets.open(cfg.host, self.clock)
            stack.callback(downlinks.close)
            self.controller = Controller(
                self.store, self.store, self.clock,
                {Protocol.UDP: downlinks.udp, Protocol.COAP: downlinks.coap,
                 Protocol.LWM2M: Lwm2mSender(self.lwm2m)}, *self._downlink_hand_off())
            await self.controller.housekeeping()
            stack.push_async_callback(self.controller.stop)
            self.pipeline = Pipeline(
                lookup, self.store, self.store, self._translator or self.translator,
                self.admin_logs, self.clock,
                self.metrics, NoLocator(), self.controller.on_activity,
            )
            # unwound after the endpoints close: received uplinks are committed and answered
            stack.push_async_callback(self.pipeline.drain)

            sinks = SinkFactory(self.clock, SinkSettings(
                cfg.delivery_timeout_s, cfg.delivery_concurrency, cfg.webhook_ca_file))
            self.dispatcher = Dispatcher(
                self.store, sinks.build, self.clock, self.metrics,
                ForwarderConfig(cfg.retry_schedule(), cfg.delivery_concurrency),
                delivers=False, notify=self._tell_leader,
            )
            await self.dispatcher.start()
            stack.push_async_callback(self.dispatcher.stop)
            integrations = Integrations(self.store, self.dispatcher, self.clock,
                                        Limits(allow_http=cfg.webhook_allow_http))

            api = build_api(
                tokens, self.metrics,
                [
                    clients_api.routes(self.store, self.clock),
                    sims_api.routes(self.sims),
                    sims_api.psk_routes(self.psks),
                    inspector_api.routes(self.store, self.store, self.store, self.store,
                                         self.clock),
                    integrations_api.routes(integrations),
                    templates_api.routes(templates),
                    controller_api.routes(self.controller),
                ],
                self._health,
            )
            self.http_app = api
            runner = web.AppRunner(api, access_log=None, handle_signals=False)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site: web.BaseSite = (
                web.TCPSite(runner, cfg.http_host or cfg.host, cfg.http_port)
                if self.worker is None else web.SockSite(runner, self.worker.http))
            await site.start()
            http_port = _bound_port(runner)

            if self._may_lead:  # before the endpoints: a lone process leads before it serves
                self.leadership = Leadership(self.store, self.clock, self._lead,
                                             self._follow, cfg.leader_lease_s)
                await self.leadership.start()
                stack.push_async_callback(self.leadership.stop)
            refresh_task = asyncio.create_task(self.translator.run_forever(),
                                               name="template-refresh")
            stack.push_async_callback(cancel, refresh_task)
            controller_task = asyncio.create_task(self.controller.run_forever(),
                                                  name="downlink-housekeeping")
            stack.push_async_callback(cancel, controller_task)

            udp = await udp_endpoint.serve(
                cfg.host, cfg.udp_port, self.pipeline, self.clock, self.metrics,
                udp_endpoint.UdpConfig(max_payload=cfg.max_payload), bind=self._bind_udp,
            )
            stack.callback(udp.close)
            # CoAP :5683 (ingest, /bootstrap) and CoAPs :5684; LwM2M's routes join them
            # unless LwM2M has ports of its own (ADR 0008)
            coap_config = coap_endpoint.CoapConfig(max_payload=cfg.max_payload)
            shared = {
                False: await self._coap_port(
                    cfg.coap_port, None, coap_endpoint.CoapServerProtocol(
                        self.pipeline, self.clock, self.metrics, coap_config,
                        bootstrap=bootstrap.answer)),
                True: await self._coap_port(
                    cfg.coaps_port, KeyRole.COAP, coap_endpoint.CoapServerProtocol(
                        self.pipeline, self.clock, self.metrics, coap_config)),
            }
            own: dict[tuple[int, bool], CoapPort] = {}

            async def lwm2m_port(port: int | None, secure: bool, role: KeyRole) -> CoapPort:
                """The endpoint for a LwM2M port setting: the shared one (unset, or the
                CoAP(s) port), one opened before for the same port, or a new one."""
                base = cfg.coaps_port if secure else cfg.coap_port
                if port is None or (port != 0 and port == base):
                    return shared[secure]
                if port and (port, secure) in own:
                    return own[(port, secure)]
                opened = own[(port, secure)] = await self._coap_port(
                    port, role if secure else None, coap_endpoint.CoapServerProtocol(
                        self.pipeline, self.clock, self.metrics, coap_config,
                        Protocol.LWM2M, ingest=False))
                return opened

            server = {False: await lwm2m_port(cfg.lwm2m_port, False, KeyRole.LWM2M),
                      True: await lwm2m_port(cfg.lwm2m_coaps_port, True, KeyRole.LWM2M)}
            bootstrapper = {
                False: await lwm2m_port(cfg.lwm2m_bootstrap_port, False, KeyRole.LWM2M),
                True: await lwm2m_port(cfg.lwm2m_bootstrap_coaps_port, True,
                                       KeyRole.LWM2M_BOOTSTRAP)}
            # LwM2M bootstrap server: `POST /bs` (spec 1.6)
            server_keys = server[True].keys
            assert server_keys is not None
            self.lwm2m_bootstrap = BootstrapServer(
                lookup, self.psks, self.admin_logs, self.metrics, self.clock, Uris.build(
                    (server[False].port, server[True].port),
                    (bootstrapper[False].port, bootstrapper[True].port),
                    cfg.lwm2m_server_url, cfg.lwm2m_server_coaps_url,
                    cfg.lwm2m_bootstrap_url, cfg.lwm2m_bootstrap_coaps_url),
                cfg.host, server_keys)
            stack.push_async_callback(self.lwm2m_bootstrap.stop)
            for ep in bootstrapper.values():
                ep.protocol.routes[BS_ROUTE] = self.lwm2m_bootstrap.handler(ep.protocol,
                                                                           ep.keys)
            # LwM2M server: /rd and /dp
            for secure, ep in server.items():
                self.lwm2m.attach(ep.protocol, secure=secure)
            self.ports = BoundPorts(
                udp.port, shared[False].port, http_port, shared[True].port,
                server[False].port, server[True].port, bootstrapper[False].port,
                bootstrapper[True].port)
            self._listen_to_peers()
        except BaseException:
            await stack.aclose()
            raise
        log.info("simwire listening on %s: %s; http %s:%d; store %s", cfg.host,
                 self.ports.describe(), cfg.http_host or cfg.host, self.ports.http,
                 self.store.name)

    async def _coap_port(self, port: int, role: KeyRole | None,
                         protocol: coap_endpoint.CoapServerProtocol) -> CoapPort:
        """Bind `protocol` on `port`: plain CoAP (`role` None) or behind DTLS checking the
        keys of `role`; closed when the app stops."""
        cfg = self.config
        if role is None:
            plain = await coap_endpoint.serve(cfg.host, port, protocol, self._bind_udp)
            self._stack.callback(plain.close)
            return CoapPort(protocol, plain.port, None)
        keys = self.psks.dtls_keys(role)
        label = "COAP" if role is KeyRole.COAP else "LWM2M"
        secure = await dtls_endpoint.serve(
            cfg.host, port, protocol, keys, self.clock, self.metrics,
            dtls_endpoint.DtlsConfig(protocol=label), on_refused=self._dtls_refused,
            bind=self._bind_udp)
        self._stack.callback(secure.close)
        forget = secure.endpoint.forget

        def changed(ip: str, key: Protocol) -> None:  # the key of `key` changed for ip
            if key in role.protocols:
                forget(ip)

        self.psks.on_change.append(changed)
        return CoapPort(protocol, secure.port, keys)

    # -- worker processes (simwire.workers) -------------------------------------------------

    @property
    def _may_lead(self) -> bool:
        """Contends for the leader lease: a machine configured as `leader`, its only
        process or worker 0."""
        return self.config.leader and (self.worker is None or self.worker.leader)

    async def _lead(self) -> None:
        """This process took the leader lease (simwire.leadership): deliver, purge, sweep."""
        await self.dispatcher.lead()
        self._duties = [
            asyncio.create_task(self.retention.run_forever(), name="retention"),
            asyncio.create_task(self._end_interrupted_jobs(), name="psk-jobs"),
        ]

    async def _follow(self) -> None:
        """This process lost or released the leader lease: stop the leader's duties."""
        duties, self._duties = self._duties, []
        for task in duties:
            await cancel(task)
        await self.dispatcher.follow()

    async def _end_interrupted_jobs(self) -> None:
        """The leader's sweep: at once, then every `JOB_SWEEP_S` (real time, like
        retention's cadence; staleness is read from the clock)."""
        await every(JOB_SWEEP_S, self.psks.finish_interrupted,
                    lambda exc: log.error("ending interrupted PSK jobs failed: %s", exc))

    def _tell_leader(self, kind: str) -> None:
        """The dispatcher of a process that does not deliver: new outbox events or
        integrations. Worker 0 of this machine hears it (when it leads, it acts; another
        machine's leader finds the work by polling)."""
        if self.worker is not None and self.worker.index != 0:
            self.worker.peers.send_soon(0, kind)

    def _downlink_hand_off(self) -> tuple[Callable[[Sim, Protocol], bool] | None,
                                          Callable[[Sim], None] | None]:
        """The controller's `elsewhere` and `hand_off`: a LwM2M downlink goes from the
        worker holding the device's registration (the one its datagrams reach)."""
        worker = self.worker
        if worker is None or worker.count == 1:
            return None, None

        def elsewhere(sim: Sim, protocol: Protocol) -> bool:
            return protocol is Protocol.LWM2M and not worker.owns(sim.ip)

        def hand_off(sim: Sim) -> None:
            worker.peers.send(owner_index(sim.ip, worker.count), "downlink", iccid=sim.iccid)

        return elsewhere, hand_off

    def _listen_to_peers(self) -> None:
        """Tell the other workers about cache changes here, and act on their notices."""
        worker = self.worker
        if worker is None or worker.count == 1:
            return
        peers = worker.peers
        self._lookup.publish = lambda ips: peers.broadcast("sim", ips=list(ips))
        self.psks.publish = lambda iccid, ip, protocol: peers.broadcast(
            "psk", iccid=iccid, ip=ip, protocol=protocol.value)
        tasks: set[asyncio.Task[Any]] = set()

        def spawn(coro: Any) -> None:
            task = asyncio.get_running_loop().create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        peers.handlers.update({
            "outbox": lambda n: self.dispatcher.wake(),
            "integrations": lambda n: spawn(self.dispatcher.reconcile()),
            "sim": lambda n: self._lookup.forget(*n["ips"]),
            "psk": lambda n: self.psks.forget(n["iccid"], n["ip"], Protocol(n["protocol"])),
            "downlink": lambda n: self.controller.fire(n["iccid"]),
        })
        peers.start()
        self._stack.callback(peers.stop)
        shared = self.metrics.shared = SharedMetrics(worker.metrics_dir, worker.index)

        async def snapshot_metrics() -> None:  # for the scrapes the other workers answer
            shared.snapshot(self.metrics.registry)

        task = asyncio.get_running_loop().create_task(every(
            1.0, snapshot_metrics, lambda exc: log.warning("metrics snapshot failed: %s", exc)),
            name="metrics")
        self._stack.push_async_callback(cancel, task)

    def _dtls_refused(self, ip: str, reason: str) -> None:
        """A DTLS peer got no session (the endpoint rate-limits this per IP)."""
        _, sim = self._lookup.cached(ip)
        if sim is None:  # no SIM: the source address may be spoofed; counted, not logged
            return
        self.admin_logs.add(
            sim.org, LogType.DEVICE, LogCategory.ERROR,
            "DeviceAuthenticator[DtlsHandshakeFailed]",
            f"DTLS session refused for {ip}: {reason}", iccid=sim.iccid, imsi=sim.imsi,
            ip=ip, rate_key=f"dtls:{ip}")

    async def stop(self) -> None:
        await self._stack.aclose()

    async def _health(self) -> dict[str, Any]:
        health: dict[str, Any] = {"status": "ok", "store": self.store.name, "leader": (
            self.leadership is not None and self.leadership.leading)}
        if self.worker is not None:
            health["worker"] = {"index": self.worker.index, "count": self.worker.count,
                                "pid": self.worker.pid}
        return health

    async def __aenter__(self) -> Simwire:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _bound_port(runner: web.AppRunner) -> int:
    addr = runner.addresses[0]
    return int(addr[1])


async def run(config: Config, worker: WorkerContext | None = None) -> None:
    """`simwire serve` (or one of its `--workers`): run until SIGINT/SIGTERM (or the
    supervisor is gone), then shut down in order."""
    app = Simwire(config, worker=worker)
    await app.start()
    if app.generated_admin is not None:
        cid, secret = app.generated_admin
        # Printed once, to the operator's terminal, never to the log.
        print(f"Created the first admin API client. client_id={cid} client_secret={secret}\n"
              "Store the secret now: it is not shown again.", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if worker is not None:
        worker.watch_supervisor(stop.set)
    # A long-running server: move start-up objects out of the collector's sight and let
    # the young generation grow (the hot path allocates many short-lived containers).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    if worker is not None:
        worker.ready()  # the supervisor prints the ready line once every worker is
    else:
        print(f"simwire ready {app.ports.describe()} http={app.ports.http}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await app.stop()
