"""`simwire` command line: `serve`, `sims import`, `templates test|encode`,
`aws provision|endpoint`. Entry point of the console script."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from simwire.config import Config, load_config
from simwire.logs import setup_logging


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file (flat keys or a [simwire] table)")
    p.add_argument("--data-dir", dest="data_dir", help="directory of the embedded SQLite store")
    p.add_argument("--store", help="'sqlite' (default) or a mongodb:// URL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simwire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the device endpoints and the API")
    _store_flags(serve)
    serve.add_argument("--host", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--http-host", dest="http_host", help="API address if not --host")
    serve.add_argument("--udp-port", dest="udp_port", type=int, help="default 4445")
    serve.add_argument("--coap-port", dest="coap_port", type=int, help="default 5683")
    serve.add_argument("--coaps-port", dest="coaps_port", type=int,
                       help="CoAP over DTLS-PSK, default 5684")
    serve.add_argument("--lwm2m-port", dest="lwm2m_port", type=int,
                       help="LwM2M server on a plain port of its own (default: the CoAP port)")
    serve.add_argument("--lwm2m-coaps-port", dest="lwm2m_coaps_port", type=int,
                       help="LwM2M server behind DTLS on a port of its own, LWM2M keys "
                            "(default: the CoAPs port)")
    serve.add_argument("--lwm2m-bootstrap-port", dest="lwm2m_bootstrap_port", type=int,
                       help="LwM2M bootstrap server on a plain port of its own "
                            "(default: the CoAP port)")
    serve.add_argument("--lwm2m-bootstrap-coaps-port", dest="lwm2m_bootstrap_coaps_port",
                       type=int, help="LwM2M bootstrap server behind DTLS on a port of its "
                                      "own (default: the CoAPs port)")
    serve.add_argument("--http-port", dest="http_port", type=int, help="default 8080")
    serve.add_argument("--workers", type=int,
                       help="worker processes sharing the ports (default 1; see docs/deploy.md)")
    serve.add_argument("--log-level", dest="log_level")
    serve.add_argument("--log-format", dest="log_format", choices=["text", "json"])

    sims = sub.add_parser("sims", help="SIM registry")
    sims_sub = sims.add_subparsers(dest="sims_command", required=True)
    imp = sims_sub.add_parser("import", help="import SIMs from a CSV file")
    imp.add_argument("file", type=Path, help="CSV with header iccid,imsi,ip,imei,label,status")
    _store_flags(imp)

    templates = sub.add_parser("templates", help="Energy Saver (BCL) templates, offline")
    templates_sub = templates.add_subparsers(dest="templates_command", required=True)
    test = templates_sub.add_parser(
        "test", help="translate a payload: prints translatedPayload, reducedBytes, "
        "energyUsageReduction (exit 1: payload not translatable, 2: invalid template)")
    test.add_argument("template", type=Path, help="the template, a JSON file")
    test.add_argument("payload", help="the device payload in hex (spaces allowed)")
    encode = templates_sub.add_parser(
        "encode", help="encode JSON values into a device payload, printed in hex")
    encode.add_argument("template", type=Path, help="the template, a JSON file")
    encode.add_argument("values", help="the values as JSON text (shaped like the output)")
    encode.add_argument("--switch", action="append", default=None, metavar="JSON",
                        help="force the case constant of each switch met, in order "
                        "(JSON value; null: the default)")

    aws = sub.add_parser("aws", help="AWS IoT Core things and certificates (needs simwire[aws])")
    aws_sub = aws.add_subparsers(dest="aws_command", required=True)
    prov = aws_sub.add_parser("provision", help="a thing, certificate and policy per SIM")
    prov.add_argument("--region", required=True)
    sims_from = prov.add_mutually_exclusive_group(required=True)
    sims_from.add_argument("--iccid", dest="iccids", action="append", metavar="ICCID",
                           help="repeat for several SIMs")
    sims_from.add_argument("--from-sims-csv", dest="sims_csv", type=Path, metavar="FILE",
                           help="CSV with an iccid column (as for `sims import`)")
    prov.add_argument("--policy-name", dest="policy_name", required=True)
    prov.add_argument("--out", type=Path, required=True,
                      help="directory for <iccid>.cert.pem and <iccid>.private.key")
    prov.add_argument("--endpoint-url", dest="endpoint_url", help="IoT control-plane URL")
    endpoint = aws_sub.add_parser("endpoint", help="print the iot:Data-ATS endpoint")
    endpoint.add_argument("--region", required=True)
    endpoint.add_argument("--endpoint-url", dest="endpoint_url", help="IoT control-plane URL")
    return parser


def _config(args: argparse.Namespace, names: tuple[str, ...]) -> Config:
    flags: dict[str, Any] = {n: getattr(args, n, None) for n in names}
    return load_config(args.config, flags=flags)


def serve_config(args: argparse.Namespace) -> Config:
    """The settings of `simwire serve`: file < environment < its flags."""
    return _config(args, ("data_dir", "store", "host", "http_host", "udp_port", "coap_port",
                          "coaps_port", "lwm2m_port", "lwm2m_coaps_port",
                          "lwm2m_bootstrap_port", "lwm2m_bootstrap_coaps_port", "http_port",
                          "workers", "log_level", "log_format"))


class Progress:
    """A one-line progress bar on a terminal, a line per 10 % otherwise."""

    def __init__(self, out: Any = sys.stderr) -> None:
        self._out = out
        self._tty = bool(getattr(out, "isatty", lambda: False)())
        self._last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        if self._tty:
            width = 30
            filled = width * done // max(total, 1)
            self._out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
            if done == total:
                self._out.write("\n")
        else:
            decile = 10 * done // max(total, 1)
            if decile != self._last_decile:
                self._last_decile = decile
                self._out.write(f"imported rows: {done}/{total}\n")
        self._out.flush()


async def _import(cfg: Config, path: Path, text: str) -> int:
    from authenticator.lookup import SimLookup
    from authenticator.management import SimManagement
    from simwire.clock import SystemClock
    from simwire.errors import SimwireError
    from simwire.storage import open_store

    store = await open_store(cfg.store, cfg.data_dir, cfg.sqlite_synchronous, cfg.retention_days)
    try:
        clock = SystemClock()
        mgmt = SimManagement(store, SimLookup(store, clock), clock)
        try:
            report = await mgmt.import_csv(text, progress=Progress())
        except SimwireError as exc:
            print(f"error: {path}: {exc.errors[0]['message']}", file=sys.stderr)
            return 2
    finally:
        await store.close()
    for line, err in report.errors:
        print(f"{path}:{line}: {err}", file=sys.stderr)
    print(f"imported {report.imported} of {report.total} rows, {len(report.errors)} rejected")
    return 0 if not report.errors else 1


def _aws(args: argparse.Namespace) -> int:
    try:
        import boto3  # noqa: F401
    except ImportError:
        print("error: `simwire aws` needs boto3: install simwire[aws]", file=sys.stderr)
        return 2
    from integrator.forwarders import aws_provision

    if args.aws_command == "endpoint":
        return aws_provision.run_endpoint(region=args.region, endpoint_url=args.endpoint_url)
    return aws_provision.run_provision(
        region=args.region, iccids=args.iccids, sims_csv=args.sims_csv,
        policy_name=args.policy_name, out_dir=args.out, endpoint_url=args.endpoint_url)


def _templates(args: argparse.Namespace) -> int:
    """`simwire templates test|encode`: offline, no store."""
    import json

    from energy_saver import bcl
    from energy_saver.codec import Codec, DecodeError, EncodeError
    from energy_saver.service import tester_result

    try:
        codec = Codec(bcl.parse_text(args.template.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {args.template}: {exc}", file=sys.stderr)
        return 2
    except bcl.TemplateError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if args.templates_command == "test":
        try:
            payload = bytes.fromhex(args.payload)
        except ValueError:
            print(f"error: not hex: {args.payload!r}", file=sys.stderr)
            return 2
        try:
            result = tester_result(codec, payload)
        except DecodeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(json.dumps(result, ensure_ascii=False))
        return 0
    try:
        values = json.loads(args.values)
        switch = None if args.switch is None else [json.loads(s) for s in args.switch]
    except ValueError as exc:
        print(f"error: not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(values, dict):
        print("error: values must be a JSON object", file=sys.stderr)
        return 2
    try:
        print(codec.encode(values, switch).hex())
    except EncodeError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "aws":
        return _aws(args)
    if args.command == "templates":
        return _templates(args)
    try:
        if args.command == "serve":
            cfg = serve_config(args)
        else:
            cfg = _config(args, ("data_dir", "store"))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(cfg, sys.argv[1:] if argv is None else argv)
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 2
    return int(_run(_import(cfg, args.file, text)))


def _serve(cfg: Config, argv: list[str]) -> int:
    """`simwire serve`: one process, the supervisor of `--workers N`, or (started by that
    supervisor with SIMWIRE_WORKER set) one of its workers."""
    from simwire.workers import Supervisor, WorkerContext

    try:
        worker = WorkerContext.from_env()
        if worker is not None:
            cfg = cfg.with_overrides(worker.ports)
            setup_logging(cfg.log_level, cfg.log_format, f"w{worker.index}")
        else:
            setup_logging(cfg.log_level, cfg.log_format)
            if cfg.workers > 1:
                try:
                    supervisor = Supervisor(cfg, argv)
                except OSError as exc:
                    print(f"error: cannot bind: {exc}", file=sys.stderr)
                    return 2
                return int(_run(supervisor.run()))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from simwire.app import run

    _run(run(cfg, worker))
    return 0


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
