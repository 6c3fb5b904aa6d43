"""AWS IoT Core over HTTPS: the publisher `AwsSink` (integrator.forwarders.sinks) uses for an
AWS integration with the HTTPS transport. Needs boto3 (the optional extra `simwire[aws]`).

boto3 is blocking: every AWS call runs in the publisher's own bounded thread pool; the
asyncio side never has more calls in flight than the pool has threads, so a call's deadline
never includes time spent queueing for a thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.credentials import CredentialResolver, RefreshableCredentials
from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError
from botocore.exceptions import ConnectTimeoutError as BotoConnectTimeoutError
from botocore.session import Session as BotocoreSession

from integrator.forwarders.base import DeliveryError

log = logging.getLogger("simwire.integrator.aws_https")

ROLE_SESSION_NAME = "simwire"
_MAX_MESSAGE = 300
# AWS echoes signed headers (x-amz-security-token among them) in signature-mismatch messages
_SIGNATURE_DETAILS = ("The Canonical String", "The String-to-Sign", "Canonical String")


@dataclass(frozen=True, slots=True)
class _Clients:
    data: Any
    iot: Any | None
    sts: Any | None
    endpoint_url: str


class _FixedProvider:
    """A botocore credential provider that hands out one (refreshable) credentials object."""

    METHOD = "simwire-assume-role"
    CANONICAL_NAME = "custom-simwire-assume-role"

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials

    def load(self) -> Any:
        return self._credentials


class IotDataPublisher:
    """AWS IoT Core over HTTPS: `iot-data publish` through boto3, one call per message.

    Credentials: the static keys if given, else boto3's default chain (env, profile, instance
    role...); with `role_arn`, those only call `sts:AssumeRole` (session name "simwire",
    `external_id` if set), and the assumed-role credentials are refreshed by botocore before
    they expire. `endpoint_url=None` resolves the account's `iot:Data-ATS` endpoint with
    `iot:DescribeEndpoint` in `start`. No botocore retries: the dispatcher has its own
    retry schedule. `AwsSink` calls `start` once, `publish` concurrently, then `close`."""

    def __init__(
        self, *, region: str, endpoint_url: str | None = None,
        access_key_id: str | None = None, secret_access_key: str | None = None,
        session_token: str | None = None,
        role_arn: str | None = None, external_id: str | None = None,
        sts_endpoint_url: str | None = None, iot_endpoint_url: str | None = None,
        qos: int = 1, timeout_s: float = 20.0, max_workers: int = 8,
    ) -> None:
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        if session_token is not None and access_key_id is None:
            raise ValueError("session_token needs access_key_id and secret_access_key")
        if external_id is not None and role_arn is None:
            raise ValueError("external_id needs role_arn")
        if timeout_s <= 0 or max_workers < 1:
            raise ValueError("timeout_s must be > 0 and max_workers >= 1")
        self._region = region
        self._endpoint_url = endpoint_url
        self._keys = (access_key_id, secret_access_key, session_token)
        self._role_arn = role_arn
        self._external_id = external_id
        self._sts_endpoint_url = sts_endpoint_url
        self._iot_endpoint_url = iot_endpoint_url
        self._qos = qos
        self._timeout_s = timeout_s
        self._max_workers = max_workers
        # one AWS call: connect + read timeouts, plus a little slack
        self._deadline_s = 2 * timeout_s + 1.0
        self._botocore_config = Config(
            connect_timeout=timeout_s, read_timeout=timeout_s,
            retries={"mode": "standard", "total_max_attempts": 1},
            max_pool_connections=max_workers, user_agent_extra="simwire",
        )
        self._slots = asyncio.Semaphore(max_workers)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._clients: _Clients | None = None
        self._resolved_endpoint_url: str | None = None
        self._issued: tuple[str, ...] = ()
        self.credential_refreshes = 0
        """How many times `sts:AssumeRole` issued credentials (start, then each refresh)."""

    @property
    def endpoint_url(self) -> str | None:
        """The data endpoint publishes go to (resolved by `start` if not given)."""
        return self._endpoint_url or self._resolved_endpoint_url

    @property
    def auth(self) -> str:
        """Where credentials come from, for logs: never the credentials themselves."""
        base = "static keys" if self._keys[0] is not None else "default chain"
        return f"assume role {self._role_arn} with {base}" if self._role_arn else base

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the session and clients and resolve the endpoint, in the pool's threads.
        Raises DeliveryError if credentials, `sts:AssumeRole` or the endpoint fail."""
        if self._clients is not None:
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self._max_workers, thread_name_prefix="simwire-aws-https")
        # building may take an AssumeRole and a DescribeEndpoint call
        self._clients = await self._run("start", self._build, deadline_s=2 * self._deadline_s)
        self._resolved_endpoint_url = self._clients.endpoint_url
        log.info("AWS IoT HTTPS publisher ready: region %s, endpoint %s, credentials: %s",
                 self._region, self._clients.endpoint_url, self.auth)

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish one message; raise DeliveryError (free of secrets) if AWS did not take it."""
        clients = self._clients
        if clients is None:
            raise DeliveryError("AWS IoT HTTPS publisher is not started")
        await self._run(f"publish to {topic!r}", clients.data.publish,
                        topic=topic, qos=self._qos, payload=payload)

    async def close(self) -> None:
        """Wait for calls still running in the pool, then close the HTTP connections."""
        executor, self._executor = self._executor, None
        clients, self._clients = self._clients, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        if clients is not None:
            for client in (clients.data, clients.iot, clients.sts):
                if client is not None:
                    client.close()

    # --- calls in the pool -----------------------------------------------------------------

    async def _run(self, what: str, fn: Any, *, deadline_s: float | None = None,
                   **kwargs: Any) -> Any:
        """Run `fn(**kwargs)` in a pool thread within the deadline; map failures to
        DeliveryError. The slot is held until the thread is done, even after a timeout."""
        executor = self._executor
        if executor is None:
            raise DeliveryError("AWS IoT HTTPS publisher is closed")
        deadline = self._deadline_s if deadline_s is None else deadline_s
        loop = asyncio.get_running_loop()
        await self._slots.acquire()
        try:
            future = executor.submit(fn, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._slots.release))
        try:
            async with asyncio.timeout(deadline):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            raise DeliveryError(f"AWS IoT {what}: timed out after {deadline:g} s") from None
        except (ClientError, BotoCoreError, ValueError) as exc:
            # `from None`: botocore's own message may echo signed headers in a traceback
            raise DeliveryError(f"AWS IoT {what}: {self._describe(exc)}") from None

    def _build(self) -> _Clients:
        """(pool thread) Session, optional assumed role, clients, data endpoint."""
        access_key_id, secret_access_key, session_token = self._keys
        base = boto3.Session(aws_access_key_id=access_key_id,
                             aws_secret_access_key=secret_access_key,
                             aws_session_token=session_token, region_name=self._region)
        if base.get_credentials() is None:
            raise DeliveryError("AWS IoT start: no AWS credentials (none given and boto3's "
                                "default chain found none)")
        session, sts = base, None
        if self._role_arn is not None:
            sts = base.client("sts", endpoint_url=self._sts_endpoint_url,
                              config=self._botocore_config)
            session = self._assumed_role_session(sts)
        iot = None
        endpoint_url = self._endpoint_url
        if endpoint_url is None:
            iot = session.client("iot", endpoint_url=self._iot_endpoint_url,
                                 config=self._botocore_config)
            address = iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]
            endpoint_url = f"https://{address}"
        data = session.client("iot-data", endpoint_url=endpoint_url,
                              config=self._botocore_config)
        return _Clients(data=data, iot=iot, sts=sts, endpoint_url=endpoint_url)

    def _assumed_role_session(self, sts: Any) -> Any:
        """(pool thread) A boto3 session whose credentials botocore refreshes through
        `_assume_role` ahead of their expiry (15 min before, blocking from 10 min before)."""

        def assume_role() -> dict[str, str]:
            params = {"RoleArn": self._role_arn, "RoleSessionName": ROLE_SESSION_NAME}
            if self._external_id is not None:
                params["ExternalId"] = self._external_id
            creds = sts.assume_role(**params)["Credentials"]
            self._issued = (creds["AccessKeyId"], creds["SecretAccessKey"],
                            creds["SessionToken"])
            self.credential_refreshes += 1
            return {"access_key": creds["AccessKeyId"], "secret_key": creds["SecretAccessKey"],
                    "token": creds["SessionToken"],
                    "expiry_time": creds["Expiration"].isoformat()}

        credentials = RefreshableCredentials.create_from_metadata(
            metadata=assume_role(), refresh_using=assume_role, method="sts-assume-role")
        botocore_session = BotocoreSession()
        botocore_session.register_component(
            "credential_provider", CredentialResolver([_FixedProvider(credentials)]))
        return boto3.Session(botocore_session=botocore_session, region_name=self._region)

    # --- error messages --------------------------------------------------------------------

    def _describe(self, exc: Exception) -> str:
        """A user-facing reason: error code, HTTP status and AWS's message, with every
        credential we know of redacted and signature details cut off."""
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            text = f"{error.get('Code', 'error')} (HTTP {status}): {error.get('Message', '')}"
        elif isinstance(exc, ReadTimeoutError | BotoConnectTimeoutError):
            text = f"timed out after {self._timeout_s:g} s ({exc})"
        else:
            text = f"{type(exc).__name__}: {exc}"
        for marker in _SIGNATURE_DETAILS:
            text = text.split(marker, 1)[0]
        for secret in (*self._keys, *self._issued):
            if secret:
                text = text.replace(secret, "[redacted]")
        text = " ".join(text.split()).rstrip(":")
        return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."
