"""`simwire aws provision` and `simwire aws endpoint` (simwire.cli calls `run_provision` and
`run_endpoint`): one AWS IoT thing per SIM, named by its ICCID, with its own X.509
certificate and a shared least-privilege policy. Needs boto3 (the extra `simwire[aws]`).

Re-running is safe: existing things and the policy are kept, and a SIM whose certificate or
key file already exists in the output directory gets no new certificate (AWS hands out a
private key only once, so an existing key file is never overwritten).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from simwire.model import ICCID_RE

THING_NAME_VAR = "${iot:Connection.Thing.ThingName}"


@dataclass(frozen=True, slots=True)
class ProvisionedSim:
    """What `provision` did for one ICCID (no key material)."""

    iccid: str
    thing_arn: str
    thing_created: bool
    certificate_id: str | None
    """The new certificate, or None if files existed and no certificate was issued."""
    cert_path: Path
    key_path: Path


@dataclass(frozen=True, slots=True)
class ProvisionReport:
    policy_name: str
    policy_created: bool
    sims: list[ProvisionedSim]


def iot_client(region: str, endpoint_url: str | None = None) -> Any:
    """A boto3 `iot` (control plane) client: credentials from boto3's default chain,
    botocore's standard retries (throttling is common when provisioning many SIMs)."""
    config = Config(connect_timeout=10, read_timeout=30, user_agent_extra="simwire",
                    retries={"mode": "standard", "max_attempts": 5})
    return boto3.client("iot", region_name=region, endpoint_url=endpoint_url, config=config)


def data_endpoint(iot: Any) -> str:
    """The account's `iot:Data-ATS` endpoint address (host name, no scheme)."""
    return str(iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"])


def device_policy(thing_arn: str) -> str:
    """A policy for devices that connect as their thing: client id = thing name, publish,
    subscribe and receive only below `<thing name>/`. Scoped to the partition, region and
    account of `thing_arn`."""
    partition, _service, region, account = thing_arn.split(":")[1:5]
    prefix = f"arn:{partition}:iot:{region}:{account}"
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect",
             "Resource": f"{prefix}:client/{THING_NAME_VAR}",
             "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": f"{prefix}:topic/{THING_NAME_VAR}/*"},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": f"{prefix}:topicfilter/{THING_NAME_VAR}/*"},
        ],
    }, indent=2)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def ensure_thing(iot: Any, name: str) -> tuple[str, bool]:
    """(thing ARN, created): create the thing unless it exists."""
    try:
        return str(iot.describe_thing(thingName=name)["thingArn"]), False
    except ClientError as exc:
        if _error_code(exc) != "ResourceNotFoundException":
            raise
    try:
        return str(iot.create_thing(thingName=name)["thingArn"]), True
    except ClientError as exc:  # created in between
        if _error_code(exc) != "ResourceAlreadyExistsException":
            raise
    return str(iot.describe_thing(thingName=name)["thingArn"]), False


def ensure_policy(iot: Any, name: str, document: str) -> bool:
    """Create the policy unless one of that name exists (an existing one is not changed);
    returns whether it was created."""
    try:
        iot.get_policy(policyName=name)
        return False
    except ClientError as exc:
        if _error_code(exc) != "ResourceNotFoundException":
            raise
    try:
        iot.create_policy(policyName=name, policyDocument=document)
        return True
    except ClientError as exc:
        if _error_code(exc) != "ResourceAlreadyExistsException":
            raise
        return False


def _write_new(path: Path, data: str, mode: int) -> None:
    """Write a file that must not exist yet, with exactly `mode` (whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def provision(iot: Any, iccids: Iterable[str], policy_name: str, out_dir: Path, *,
              on_sim: Callable[[ProvisionedSim], None] | None = None) -> ProvisionReport:
    """For each ICCID: thing, certificate (active) with its files in `out_dir`, policy and
    thing attached to the certificate. The policy is created on the first ICCID (its ARNs
    need the account). Stops at the first AWS error (ClientError, BotoCoreError): what was
    done so far stays, and re-running continues. `on_sim` is called after each ICCID."""
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    policy_created: bool | None = None
    sims: list[ProvisionedSim] = []
    for iccid in iccids:
        thing_arn, thing_created = ensure_thing(iot, iccid)
        if policy_created is None:
            policy_created = ensure_policy(iot, policy_name, device_policy(thing_arn))
        cert_path, key_path = out_dir / f"{iccid}.cert.pem", out_dir / f"{iccid}.private.key"
        certificate_id = None
        if not cert_path.exists() and not key_path.exists():
            cert = iot.create_keys_and_certificate(setAsActive=True)
            certificate_id = str(cert["certificateId"])
            _write_new(key_path, cert["keyPair"]["PrivateKey"], 0o600)
            _write_new(cert_path, cert["certificatePem"], 0o644)
            iot.attach_policy(policyName=policy_name, target=cert["certificateArn"])
            iot.attach_thing_principal(thingName=iccid, principal=cert["certificateArn"])
        sim = ProvisionedSim(iccid, thing_arn, thing_created, certificate_id, cert_path,
                             key_path)
        sims.append(sim)
        if on_sim is not None:
            on_sim(sim)
    return ProvisionReport(policy_name, bool(policy_created), sims)


def check_iccids(iccids: Iterable[str]) -> list[str]:
    """ICCIDs stripped and de-duplicated (order kept); ValueError on an invalid one."""
    out: dict[str, None] = {}
    for raw in iccids:
        iccid = raw.strip()
        if not ICCID_RE.match(iccid):
            raise ValueError(f"invalid ICCID {raw!r} (19 or 20 digits)")
        out[iccid] = None
    if not out:
        raise ValueError("no ICCIDs given")
    return list(out)


def read_sims_csv(path: Path) -> list[str]:
    """The `iccid` column of a CSV with a header row (the `simwire sims import` format)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "iccid" not in reader.fieldnames:
            raise ValueError(f"{path}: no 'iccid' column in the header")
        return [row["iccid"] or "" for row in reader]


# --- command line --------------------------------------------------------------------------

def _aws_error(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}"
    return f"{type(exc).__name__}: {exc}"


def _client_or_none(region: str, endpoint_url: str | None, err: TextIO) -> Any:
    try:
        return iot_client(region, endpoint_url)
    except (BotoCoreError, ValueError) as exc:  # unknown region, malformed endpoint URL
        print(f"error: {exc}", file=err)
        return None


def run_provision(*, region: str, iccids: list[str] | None, sims_csv: Path | None,
                  policy_name: str, out_dir: Path, endpoint_url: str | None = None,
                  out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`simwire aws provision`: prints a line per SIM and a summary (never key material).
    Exit status 0, 1 on an AWS error, 2 on bad input."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        wanted = check_iccids(read_sims_csv(sims_csv) if sims_csv is not None else iccids or [])
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        print(f"error: {exc}", file=err)
        return 2

    def show(sim: ProvisionedSim) -> None:
        thing = "created" if sim.thing_created else "exists"
        cert = (f"certificate {sim.certificate_id}" if sim.certificate_id
                else "files exist, no new certificate")
        print(f"{sim.iccid}  thing {thing}  {cert}", file=out, flush=True)

    iot = _client_or_none(region, endpoint_url, err)
    if iot is None:
        return 2
    try:
        report = provision(iot, wanted, policy_name, out_dir, on_sim=show)
    except (ClientError, BotoCoreError) as exc:
        print(f"error: AWS: {_aws_error(exc)}", file=err)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=err)
        return 1
    finally:
        iot.close()
    issued = sum(1 for s in report.sims if s.certificate_id)
    created = sum(1 for s in report.sims if s.thing_created)
    print(f"policy {report.policy_name}: {'created' if report.policy_created else 'exists'}",
          file=out)
    print(f"{len(report.sims)} SIMs: {created} things created, {len(report.sims) - created} "
          f"existed; {issued} certificates issued; files in {out_dir} (keys mode 0600)",
          file=out)
    return 0


def run_endpoint(*, region: str, endpoint_url: str | None = None,
                 out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`simwire aws endpoint`: prints the `iot:Data-ATS` endpoint address."""
    iot = _client_or_none(region, endpoint_url, err or sys.stderr)
    if iot is None:
        return 2
    try:
        print(data_endpoint(iot), file=out or sys.stdout)
    except (ClientError, BotoCoreError) as exc:
        print(f"error: AWS: {_aws_error(exc)}", file=err or sys.stderr)
        return 1
    finally:
        iot.close()
    return 0
