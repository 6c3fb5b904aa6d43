"""AWS IoT Core over HTTPS (`IotDataPublisher`) and `simwire aws` against a real moto_server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.credentials import RefreshableCredentials

from integrator.forwarders.aws_https import IotDataPublisher
from integrator.forwarders.base import DeliveryError
from tests.support.moto import (
    publish_requests,
    published,
    recorded_requests,
    reset,
    state,
)
from tests.support.net import free_port

REGION = "eu-central-1"
ACCESS_KEY_ID = "AKIASIMWIRETEST00001"
SECRET_KEY = "sEcReT/sImWiRe+tEsT/0123456789abcdefghij"
SESSION_TOKEN = "SeSsIoNtOkEn-simwire-test-0123456789"
ICCIDS = ["8988228066600000001", "8988228066600000002", "8988228066600000003"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials, profiles or instance metadata from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def moto(moto_url: str) -> str:
    """The session's moto_server, emptied for this test."""
    reset(moto_url)
    return moto_url


@contextmanager
def aws(service: str, url: str) -> Iterator[Any]:
    client = boto3.client(service, region_name=REGION, endpoint_url=url,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    try:
        yield client
    finally:
        client.close()


def publisher(url: str | None, **kwargs: Any) -> IotDataPublisher:
    kwargs.setdefault("access_key_id", ACCESS_KEY_ID)
    kwargs.setdefault("secret_access_key", SECRET_KEY)
    return IotDataPublisher(region=REGION, endpoint_url=url, **kwargs)


# --- publishing -----------------------------------------------------------------------------

async def test_publishes_exact_topics_and_payloads(moto: str) -> None:
    topics = [f"{ICCIDS[0]}/messages", "lifecycle", "error"]
    sent = [(topics[i % 3], json.dumps({"id": f"evt-{i}", "text": "grüße"}).encode())
            for i in range(19)]
    sent.append((topics[0], b"\x00\xff binary \x80"))
    pub = publisher(moto, session_token=SESSION_TOKEN, max_workers=4)
    await pub.start()
    try:
        await asyncio.gather(*(pub.publish(t, p) for t, p in sent))
    finally:
        await pub.close()
    got = await asyncio.to_thread(published, moto)
    assert sorted(got) == sorted(sent)
    assert len(got) == 20
    requests = await asyncio.to_thread(publish_requests, moto)
    assert {r.query for r in requests} == {"qos=1"}
    assert {r.access_key_id for r in requests} == {ACCESS_KEY_ID}
    assert {r.header("X-Amz-Security-Token") for r in requests} == {SESSION_TOKEN}


async def test_assume_role_publishes_with_sts_credentials(moto: str) -> None:
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
        "Action": "sts:AssumeRole"}]}
    with aws("iam", moto) as iam:
        role_arn = iam.create_role(RoleName="simwire-publisher",
                                   AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    pub = publisher(moto, role_arn=role_arn, external_id="ext-4711", sts_endpoint_url=moto)
    await pub.start()
    try:
        await pub.publish("lifecycle", b'{"a":1}')
        await pub.publish(f"{ICCIDS[1]}/messages", b'{"b":2}')
        assert pub.credential_refreshes == 1
    finally:
        await pub.close()
    # moto describes a fake AWS host as data endpoint: only resolve it, with the role
    resolving = publisher(None, role_arn=role_arn, external_id="ext-4711",
                          sts_endpoint_url=moto, iot_endpoint_url=moto)
    await resolving.start()
    await resolving.close()
    assert resolving.credential_refreshes == 1

    assumed = (await asyncio.to_thread(state, moto))["sts"]["AssumedRole"]
    assert [(a["role_arn"], a["session_name"], a["external_id"]) for a in assumed] == [
        (role_arn, "simwire", "ext-4711")] * 2
    assert assumed[0]["access_key_id"].startswith("ASIA")
    requests = await asyncio.to_thread(recorded_requests, moto)
    signers = [(r.service, r.access_key_id, r.header("X-Amz-Security-Token"))
               for r in requests if r.service != "iam"]
    first, second = ((a["access_key_id"], a["session_token"]) for a in assumed)
    assert signers == [("sts", ACCESS_KEY_ID, None), ("iotdata", *first), ("iotdata", *first),
                       ("sts", ACCESS_KEY_ID, None), ("iot", *second)]
    assert await asyncio.to_thread(published, moto) == [
        ("lifecycle", b'{"a":1}'), (f"{ICCIDS[1]}/messages", b'{"b":2}')]


async def test_assumed_role_is_refreshed_before_expiry(
        moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # moto issues 1 h credentials; make botocore see them as due for a blocking refresh
    monkeypatch.setattr(RefreshableCredentials, "_advisory_refresh_timeout", 4000)
    monkeypatch.setattr(RefreshableCredentials, "_mandatory_refresh_timeout", 4000)
    role_arn = "arn:aws:iam::123456789012:role/simwire-publisher"
    pub = publisher(moto, role_arn=role_arn, sts_endpoint_url=moto)
    await pub.start()
    try:
        await pub.publish("lifecycle", b"1")
        await pub.publish("lifecycle", b"2")
    finally:
        await pub.close()
    assert pub.credential_refreshes == 3  # start, then before each publish
    assumed = (await asyncio.to_thread(state, moto))["sts"]["AssumedRole"]
    requests = await asyncio.to_thread(publish_requests, moto)
    assert [r.access_key_id for r in requests] == [a["access_key_id"] for a in assumed[1:]]
    assert len({a["access_key_id"] for a in assumed}) == 3


async def test_resolves_data_endpoint_with_default_chain(
        moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    pub = IotDataPublisher(region=REGION, iot_endpoint_url=moto)
    assert pub.endpoint_url is None
    await pub.start()
    await pub.close()
    endpoints = (await asyncio.to_thread(state, moto))["iot"]["FakeEndpoint"]
    assert [e["endpoint_type"] for e in endpoints] == ["iot:Data-ATS"]
    assert pub.endpoint_url == f"https://{endpoints[0]['endpoint']}"
    assert endpoints[0]["endpoint"].endswith(f"-ats.iot.{REGION}.amazonaws.com")


async def test_no_credentials_fails_start() -> None:
    pub = IotDataPublisher(region=REGION, endpoint_url="http://127.0.0.1:9")
    with pytest.raises(DeliveryError, match="no AWS credentials"):
        await pub.start()
    await pub.close()


# --- failures -------------------------------------------------------------------------------

def assert_secret_free(err: DeliveryError) -> None:
    text = f"{err} {err!r}"
    for secret in (SECRET_KEY, ACCESS_KEY_ID, SESSION_TOKEN):
        assert secret not in text
    assert err.__cause__ is None and err.__suppress_context__


async def test_unreachable_endpoint_fails_fast_without_secrets() -> None:
    pub = publisher(f"http://127.0.0.1:{free_port()}", session_token=SESSION_TOKEN,
                    timeout_s=1.0)
    await pub.start()
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryError) as caught:
            await pub.publish(f"{ICCIDS[0]}/messages", b"{}")
        assert time.monotonic() - started < 2.0
    finally:
        await pub.close()
    assert "publish to '8988228066600000001/messages'" in str(caught.value)
    assert "connect" in str(caught.value).lower()
    assert_secret_free(caught.value)


async def test_silent_endpoint_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        pub = publisher(f"http://127.0.0.1:{port}", timeout_s=0.3, max_workers=1)
        await pub.start()
        try:
            started = time.monotonic()
            with pytest.raises(DeliveryError, match="timed out") as caught:
                await pub.publish("error", b"{}")
            assert time.monotonic() - started < 1.6
        finally:
            await pub.close()
    assert_secret_free(caught.value)


async def test_failed_assume_role_fails_start(moto: str) -> None:
    pub = publisher(moto, role_arn="not-an-arn", sts_endpoint_url=moto, timeout_s=2.0)
    with pytest.raises(DeliveryError, match="AWS IoT start") as caught:
        await pub.start()
    await pub.close()
    assert_secret_free(caught.value)
    with pytest.raises(DeliveryError, match="not started"):
        await pub.publish("lifecycle", b"{}")


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="qos"):
        IotDataPublisher(region=REGION, qos=2)
    with pytest.raises(ValueError, match="together"):
        IotDataPublisher(region=REGION, access_key_id=ACCESS_KEY_ID)
    with pytest.raises(ValueError, match="role_arn"):
        IotDataPublisher(region=REGION, external_id="x")


# --- simwire aws ----------------------------------------------------------------------------

def simwire_aws(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simwire.cli", "aws", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SIMWIRE_"))}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET_KEY,
               AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
               AWS_EC2_METADATA_DISABLED="true", **extra)
    return env


def test_cli_provision_is_idempotent(moto: str, tmp_path: Path) -> None:
    env, out = cli_env(tmp_path), tmp_path / "certs"
    common = ["--region", REGION, "--policy-name", "simwire-devices", "--out", str(out),
              "--endpoint-url", moto]
    first = simwire_aws("provision", "--iccid", ICCIDS[0], "--iccid", ICCIDS[1], *common,
                        env=env)
    assert first.returncode == 0, first.stderr
    assert "policy simwire-devices: created" in first.stdout

    with aws("iot", moto) as iot:
        assert sorted(t["thingName"] for t in iot.list_things()["things"]) == ICCIDS[:2]
        assert len(iot.list_certificates()["certificates"]) == 2
        document = json.loads(iot.get_policy(policyName="simwire-devices")["policyDocument"])
        resources = [s["Resource"] for s in document["Statement"]]
        assert resources[0].endswith(":client/${iot:Connection.Thing.ThingName}")
        assert resources[1].endswith(":topic/${iot:Connection.Thing.ThingName}/*")
        assert all(f":{REGION}:123456789012:" in r for r in resources)
        for iccid in ICCIDS[:2]:
            [principal] = iot.list_thing_principals(thingName=iccid)["principals"]
            policies = iot.list_attached_policies(target=principal)["policies"]
            assert [p["policyName"] for p in policies] == ["simwire-devices"]
            cert_id = principal.rsplit("/", 1)[1]
            described = iot.describe_certificate(certificateId=cert_id)["certificateDescription"]
            assert described["status"] == "ACTIVE"
            cert_file, key_file = out / f"{iccid}.cert.pem", out / f"{iccid}.private.key"
            assert cert_file.read_text() == described["certificatePem"]
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            key = key_file.read_text()
            assert "PRIVATE KEY-----" in key
            assert key.splitlines()[1] not in first.stdout + first.stderr
            assert cert_id in first.stdout

    sims_csv = tmp_path / "sims.csv"
    sims_csv.write_text("iccid,imsi,ip,imei,label,status\n" + "".join(
        f"{iccid},90140500000000{n},10.0.0.{n},,,ENABLED\n" for n, iccid in enumerate(ICCIDS)))
    keys_before = {i: (out / f"{i}.private.key").read_bytes() for i in ICCIDS[:2]}
    second = simwire_aws("provision", "--from-sims-csv", str(sims_csv), *common, env=env)
    assert second.returncode == 0, second.stderr
    assert "policy simwire-devices: exists" in second.stdout
    assert "1 things created, 2 existed; 1 certificates issued" in second.stdout
    with aws("iot", moto) as iot:
        assert sorted(t["thingName"] for t in iot.list_things()["things"]) == ICCIDS
        assert [p["policyName"] for p in iot.list_policies()["policies"]] == ["simwire-devices"]
        assert len(iot.list_certificates()["certificates"]) == 3
    assert {i: (out / f"{i}.private.key").read_bytes() for i in ICCIDS[:2]} == keys_before
    assert stat.S_IMODE((out / f"{ICCIDS[2]}.private.key").stat().st_mode) == 0o600
    assert SECRET_KEY not in first.stdout + first.stderr + second.stdout + second.stderr


def test_cli_endpoint_and_errors(moto: str, tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    shown = simwire_aws("endpoint", "--region", REGION, "--endpoint-url", moto, env=env)
    assert shown.returncode == 0, shown.stderr
    [endpoint] = state(moto)["iot"]["FakeEndpoint"]
    assert shown.stdout.strip() == endpoint["endpoint"]

    bad = simwire_aws("provision", "--region", REGION, "--iccid", "12ab", "--policy-name", "p",
                      "--out", str(tmp_path / "out"), "--endpoint-url", moto, env=env)
    assert bad.returncode == 2 and "invalid ICCID" in bad.stderr

    blocker = tmp_path / "block" / "boto3"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('boto3 hidden by the test')\n")
    hidden = simwire_aws("endpoint", "--region", REGION,
                         env=cli_env(tmp_path, PYTHONPATH=str(blocker.parent)))
    assert hidden.returncode == 2
    assert "install simwire[aws]" in hidden.stderr
