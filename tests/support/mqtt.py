"""A Mosquitto broker for tests (TLS, client certificates required) and a subscriber.

    pki = make_pki(tmp_path / "pki")
    with start_mosquitto(tmp_path / "mosquitto", pki) as broker:
        async with Subscriber(broker, pki) as sub:
            ...  # publish to broker.host:broker.port with a certificate from pki
            messages = await sub.wait_for(3)

The broker listens on a free 127.0.0.1 port, trusts only `pki`'s CA and takes the client
certificate's CN as the username. `Broker.stop()` / `Broker.start()` restart it on the same
port; leaving the `with` block stops it, and reports its log if it died on its own.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.net import free_port
from tests.support.pki import Pki
from tests.support.tools import require_binary

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
HOST = "127.0.0.1"


def mosquitto_binary() -> str:
    """The `mosquitto` binary: on PATH, else in the sbin directories Debian installs it to
    (often not on a user's PATH); else skipped locally / failed in CI (`require_binary`)."""
    found = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path=os.pathsep.join(["/usr/sbin", "/usr/local/sbin", "/sbin"])
    )
    return found or require_binary("mosquitto")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class Broker:
    """A running Mosquitto: `host`, `port`; `stop()`, `kill()` and `start()` (same port)
    let a test take it away and bring it back."""

    def __init__(self, binary: str, directory: Path, port: int) -> None:
        self.host = HOST
        self.port = port
        self._binary = binary
        self._conf = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._crashed: str | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start the broker (again) and wait until its port accepts connections."""
        assert self._proc is None, "already running"
        with self.log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                [self._binary, "-c", str(self._conf)],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self._proc = proc
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _accepts(self.port):
                return
            time.sleep(0.02)
        self._stop(kill=False)
        raise RuntimeError(
            f"mosquitto did not start on port {self.port} (exit {proc.returncode}):\n"
            f"{self.log()[-3000:]}"
        )

    def stop(self) -> None:
        """SIGTERM (SIGKILL after a timeout) and wait: clients see their connection close."""
        self._stop(kill=False)

    def kill(self) -> None:
        """SIGKILL and wait (works on a paused broker too)."""
        self._stop(kill=True)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (no PUBACK)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def _stop(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is not None:
            self._crashed = self._crashed or f"mosquitto exited on its own ({proc.returncode})"
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
            proc.send_signal(signal.SIGCONT)  # a paused broker handles SIGTERM only then
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def shutdown(self) -> str | None:
        """Stop it; returns a report with the log if it had died on its own meanwhile."""
        self._stop(kill=False)
        if self._crashed is None:
            return None
        return f"{self._crashed}; mosquitto log:\n{self.log()[-3000:]}"


def write_config(directory: Path, pki: Pki, port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "mosquitto.conf"
    conf.write_text(
        "\n".join([
            "persistence false",
            # as root, mosquitto would switch to user `mosquitto` (unable to read tmp_path)
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"listener {port} {HOST}",
            f"cafile {pki.ca_cert}",
            f"certfile {pki.server_cert}",
            f"keyfile {pki.server_key}",
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
            "",
        ])
    )
    return conf


@contextmanager
def start_mosquitto(directory: Path, pki: Pki) -> Iterator[Broker]:
    """Run Mosquitto with TLS on a free 127.0.0.1 port for the `with` block (see module
    docstring). Retries on another port if the free port was taken in between."""
    binary = mosquitto_binary()
    errors: list[str] = []
    broker: Broker | None = None
    for attempt in range(3):
        port = free_port()
        workdir = directory / f"run{attempt}"
        write_config(workdir, pki, port)
        candidate = Broker(binary, workdir, port)
        try:
            candidate.start()
        except RuntimeError as e:
            errors.append(str(e))
            continue
        broker = candidate
        break
    if broker is None:
        raise RuntimeError("mosquitto did not start:\n" + "\n".join(errors))
    try:
        yield broker
    except BaseException as e:
        report = broker.shutdown()
        if report:
            e.add_note(report)
        raise
    report = broker.shutdown()
    if report:
        raise AssertionError(report)


def client_context(pki: Pki, name: str) -> ssl.SSLContext:
    """Trusts `pki`'s CA and presents the client certificate `pki.client(name)`."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(*pki.client(name))
    return context


class Subscriber:
    """A paho client subscribed to `#` (QoS 1) that collects `(topic, payload)`.

    Use as `async with Subscriber(broker, pki) as sub:`; entering returns once the broker
    acknowledged the subscription. It resubscribes after a reconnect."""

    def __init__(self, broker: Broker, pki: Pki, name: str = "subscriber") -> None:
        self._broker = broker
        self._lock = threading.Lock()
        self._messages: list[tuple[str, bytes]] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-{name}",
            protocol=mqtt.MQTTv311,
        )
        self._client.tls_set_context(client_context(pki, name))
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: mqtt.ConnectFlags,
        reason: ReasonCode, _properties: Properties | None,
    ) -> None:
        if not reason.is_failure:
            client.subscribe("#", qos=1)

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, _mid: int,
        _reasons: list[ReasonCode], _properties: Properties | None,
    ) -> None:
        self._subscribed.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._messages.append((msg.topic, bytes(msg.payload)))

    @property
    def messages(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self._messages)

    async def __aenter__(self) -> Subscriber:
        await asyncio.to_thread(self._client.connect, self._broker.host, self._broker.port)
        self._client.loop_start()
        try:
            subscribed = await asyncio.to_thread(self._subscribed.wait, START_TIMEOUT_S)
            if not subscribed:
                raise AssertionError("subscriber: no SUBACK")
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self._client.reinitialise()  # closes paho's socket pair now, not at a later GC

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        """All messages so far, once at least `n` arrived (polls until `timeout`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            messages = self.messages
            if len(messages) >= n:
                return messages
            if loop.time() >= deadline:
                raise AssertionError(f"subscriber got {len(messages)} of {n} messages")
            await asyncio.sleep(0.01)
