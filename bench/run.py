"""bench/run: every benchmark, for --workers 1 and 2, and one table of the ratios measured
in the same run (issue #7).

    bench/run [--workers 1,2] [--quick] [--out FILE] [--timeout-scale F] [--verbose]
              [--only ingest,dtls,decode,store_write,webhook,history,lwm2m]

Each benchmark runs as a subprocess (its own process group, a timeout; on timeout or Ctrl-C
it gets SIGINT so it stops its servers, then SIGKILL for what is left of its group) once per
worker count, with `--workers N` for N > 1 (decode and store_write: once, no workers) and
`--quick` when given. The last JSON object on its stdout is its result; a benchmark that
fails, times out or prints no JSON line shows `failed: <reason>` in its rows and the others
still run. Printed at the end: the machine, the git commit, one table (measurement | workers
| Simwire | baseline | ratio | goal | met), the CPU other processes used during each run,
the total wall time, and where every raw result (one JSON file) and each benchmark's
stdout/stderr log were written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(REPO))
from bench.ingest import OtherCpu, git_commit  # noqa: E402


def note(msg: str) -> None:
    print(f"[run {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the table -------------------------------------------------------------------------------


@dataclass
class Row:
    measurement: str
    workers: str
    simwire: str = ""
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    met: str = ""


@dataclass
class Cell:
    """What a row spec extracts from a benchmark's JSON result."""

    simwire: str
    baseline: str = "-"
    ratio: float | None = None
    goal: str = "-"
    met: bool | None = None


@dataclass
class Spec:
    label: Callable[[dict[str, Any], bool], str]
    """(result or {}, quick) -> the measurement's name."""
    cell: Callable[[dict[str, Any]], Cell]


def num(x: Any, unit: str = "", digits: int = 0) -> str:
    if x is None:
        return "n/a"
    text = f"{float(x):,.{digits}f}"
    return text + unit if not unit or unit.startswith("/") else f"{text} {unit}"


def get(d: dict[str, Any], *path: str) -> Any:
    """d[path[0]][path[1]]...; None when any step is missing."""
    cur: Any = d
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def ratio_of(a: Any, b: Any) -> float | None:
    return float(a) / float(b) if a is not None and b else None


def at_least(r: float | None, goal: float) -> bool | None:
    return None if r is None else r >= goal


def concurrency(res: dict[str, Any]) -> Any:
    return get(res, "params", "concurrency") or 32


# ingest (bench/ingest.py report()): raw_udp_per_s, simwire_udp_per_s, aiocoap_req_per_s,
# simwire_coap_req_per_s, coap_ratio, libcoap_req_per_s, libcoap_ratio, durable_req_per_s
def _udp(res: dict[str, Any]) -> Cell:
    r = ratio_of(res["simwire_udp_per_s"], res["raw_udp_per_s"])
    return Cell(num(res["simwire_udp_per_s"], "msg/s"), num(res["raw_udp_per_s"], "msg/s"),
                r, ">= 1.0x", at_least(r, 1.0))


def _coap_libcoap(res: dict[str, Any]) -> Cell:
    lib = res.get("libcoap_req_per_s")
    r = ratio_of(res["simwire_coap_req_per_s"], lib)
    return Cell(num(res["simwire_coap_req_per_s"], "req/s"),
                "not installed" if lib is None else num(lib, "req/s"), r, ">= 1.0x",
                at_least(r, 1.0))


def _coap_aiocoap(res: dict[str, Any]) -> Cell:
    r = ratio_of(res["simwire_coap_req_per_s"], res["aiocoap_req_per_s"])
    return Cell(num(res["simwire_coap_req_per_s"], "req/s"),
                num(res["aiocoap_req_per_s"], "req/s"), r, ">= 5x", at_least(r, 5.0))


def _coap_durable(res: dict[str, Any]) -> Cell:
    dur = res.get("durable_req_per_s")
    return Cell(num(res["simwire_coap_req_per_s"], "req/s"), num(dur, "req/s"),
                ratio_of(res["simwire_coap_req_per_s"], dur))


# dtls (bench/dtls.py): {handshakes_per_s, handshakes_per_server_cpu_s,
# requests_per_s}: {libcoap, simwire}
def _dtls(key: str, unit: str, goal: float | None) -> Callable[[dict[str, Any]], Cell]:
    def cell(res: dict[str, Any]) -> Cell:
        sim, lib = res[key]["simwire"], res[key]["libcoap"]
        r = ratio_of(sim, lib)
        return Cell(num(sim, unit), num(lib, unit), r,
                    "-" if goal is None else f">= {goal:.1f}x",
                    None if goal is None else at_least(r, goal))
    return cell


# decode (bench/decode.py, last line "kind": "result")
def _decode(res: dict[str, Any]) -> Cell:
    w = res["worst"]
    return Cell(num(w["simwire_per_s"], "/s"), num(w["hand_written_per_s"], "/s"),
                float(res["ratio"]), f">= {res.get('goal', 0.5)}x", bool(res["goal_met"]))


def _decode_label(res: dict[str, Any], quick: bool) -> str:
    w = res.get("worst")
    worst = f" (worst: {w['template']} {w['payload']})" if isinstance(w, dict) else ""
    return f"decode vs hand-written struct{worst}"


# webhook (bench/webhook.py)
def _webhook_sustained(res: dict[str, Any]) -> Cell:
    p99 = res.get("p99_ms")
    return Cell(f"{num(res['sustained_per_s'], 'ev/s')}, p99 {num(p99, 'ms')}",
                f"offered {num(res['rate_offered'], '/s')}",
                ratio_of(res["sustained_per_s"], res["rate_offered"]),
                ">= 3000/s, p99 < 250 ms", bool(res["goal_met"]))


def _webhook_drain(res: dict[str, Any]) -> Cell:
    return Cell(num(res["drain_per_s"], "ev/s"), num(res["baseline_per_s"], "ev/s"),
                ratio_of(res["drain_per_s"], res["baseline_per_s"]))


# history (bench/history.py): history_p99_ms (the worst query kind's, sequential API),
# goal_p99_ms, goal_met; baseline: the store's own SQL run raw with sqlite3 on the same file
def _history(res: dict[str, Any]) -> Cell:
    p99 = res["history_p99_ms"]
    goal = res.get("goal_p99_ms", 50)
    met = res.get("goal_met")
    if met is None and p99 is not None:
        met = p99 < goal
    raw = get(res, "kinds", str(res.get("worst_kind")), "raw", "p99_ms")
    return Cell(num(p99, "ms", 1), "-" if raw is None else f"raw SQL {num(raw, 'ms', 2)}",
                ratio_of(p99, raw), f"< {num(goal)} ms", None if met is None else bool(met))


def _history_label(res: dict[str, Any], quick: bool) -> str:
    n = None
    for key in ("messages", "stored_messages", "message_count", "n_messages", "rows"):
        for where in (res, res.get("params") or {}):
            if isinstance(where, dict) and isinstance(where.get(key), int):
                n = n or where[key]
    if n is not None:
        size = f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n:,}"
    else:
        size = "1M" if quick else "10M"
    return f"history page p99 at {size} messages" + (" (--quick)" if quick else "")


# lwm2m (bench/lwm2m.py)
def _lwm2m_rss(res: dict[str, Any]) -> Cell:
    at = res.get("rss_at_100k_kib")
    how = "measured" if res.get("rss_at_100k_measured") else "projected"
    return Cell(f"{num(res['kib_per_client'], 'KiB', 2)} ({num(at and at / 1024, 'MiB')} at "
                f"100k, {how})", "-", None, "< 1 GiB at 100k", bool(res["goal_met"]))


def _lwm2m_rate(res: dict[str, Any]) -> Cell:
    return Cell(num(res["simwire_reg_per_s"], "reg/s"), num(res["baseline_reg_per_s"], "reg/s"),
                ratio_of(res["simwire_reg_per_s"], res["baseline_reg_per_s"]))


# store_write (bench/store_write.py): rows [{devices, cpu_us, ...}], the first the baseline
def _store_write_label(res: dict[str, Any], quick: bool) -> str:
    rows = res["rows"]
    return (f"store CPU per uplink, {rows[-1]['devices']:,} devices vs {rows[0]['devices']}"
            + (" (--quick)" if quick else ""))


def _store_write(res: dict[str, Any]) -> Cell:
    rows = res["rows"]
    return Cell(num(rows[-1]["cpu_us"], "us", 1), num(rows[0]["cpu_us"], "us", 1),
                ratio_of(rows[-1]["cpu_us"], rows[0]["cpu_us"]))


def fixed(text: str) -> Callable[[dict[str, Any], bool], str]:
    return lambda res, quick: text


@dataclass
class Bench:
    name: str
    argv: list[str]
    """After the python executable; --workers N and --quick are appended."""
    specs: list[Spec]
    timeout_s: float
    quick_timeout_s: float
    per_workers: bool = True
    script: Path | None = None
    """Must exist (else: failed, not run)."""


BENCHES = [
    Bench("ingest", [str(BENCH / "ingest.py")], [
        Spec(fixed("UDP lossless ingest vs raw asyncio receiver"), _udp),
        Spec(lambda r, q: f"CoAP ingest c={concurrency(r)} vs libcoap no-op", _coap_libcoap),
        Spec(lambda r, q: f"CoAP ingest c={concurrency(r)} vs aiocoap", _coap_aiocoap),
        Spec(lambda r, q: f"CoAP ingest c={concurrency(r)} vs durable no-op (flush, ACK)",
             _coap_durable),
    ], 600, 300, script=BENCH / "ingest.py"),
    Bench("dtls", [str(BENCH / "dtls.py")], [
        Spec(fixed("DTLS PSK handshakes/s vs libcoap coap-server-openssl"),
             _dtls("handshakes_per_s", "/s", 1.0)),
        Spec(fixed("  DTLS handshakes per server CPU-second"),
             _dtls("handshakes_per_server_cpu_s", "/CPU-s", None)),
        Spec(fixed("DTLS CoAP POST req/s vs libcoap (PUT)"),
             _dtls("requests_per_s", "req/s", None)),
    ], 300, 150, script=BENCH / "dtls.py"),
    Bench("decode", ["-m", "bench.decode"], [Spec(_decode_label, _decode)], 180, 90,
          per_workers=False, script=BENCH / "decode.py"),
    Bench("store_write", [str(BENCH / "store_write.py")],
          [Spec(_store_write_label, _store_write)], 300, 120, per_workers=False,
          script=BENCH / "store_write.py"),
    Bench("webhook", [str(BENCH / "webhook.py")], [
        Spec(fixed("webhook events/s sustained"), _webhook_sustained),
        Spec(fixed("webhook backlog drain vs aiohttp client"), _webhook_drain),
    ], 600, 300, script=BENCH / "webhook.py"),
    Bench("history", [str(BENCH / "history.py")], [Spec(_history_label, _history)],
          1800, 600, script=BENCH / "history.py"),
    Bench("lwm2m", [str(BENCH / "lwm2m.py")], [
        Spec(fixed("LwM2M RSS per registered client"), _lwm2m_rss),
        Spec(fixed("LwM2M registrations/s vs baseline responder"), _lwm2m_rate),
    ], 900, 300, script=BENCH / "lwm2m.py"),
]


# --- running one benchmark -------------------------------------------------------------------


@dataclass
class Run:
    bench: str
    workers: int | None
    argv: list[str]
    log: str
    ok: bool = False
    reason: str = ""
    returncode: int | None = None
    wall_s: float = 0.0
    other_cpu_cores: float | None = None
    result: dict[str, Any] | None = field(default=None, repr=False)


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def failure_reason(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "benchmark failed" in ln:
            return ln.split("benchmark failed", 1)[1].lstrip(": ")
    for ln in reversed(lines):
        if not ln.startswith(("File ", "^", "~")):
            return ln
    return "no output on stderr"


class Interrupted(Exception):
    pass


def stop_group(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGINT to the benchmark (it stops its servers on the way out), then SIGKILL to
    whatever is left of its process group (we created it: start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):  # 2nd Ctrl-C
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_one(bench: Bench, workers: int | None, quick: bool, timeout: float, log_dir: Path,
            verbose: bool) -> Run:
    argv = [sys.executable, *bench.argv]
    if workers is not None and workers > 1:  # 1 is every benchmark's default
        argv += ["--workers", str(workers)]
    if quick:
        argv.append("--quick")
    tag = bench.name if workers is None else f"{bench.name}-w{workers}"
    out_path, err_path = log_dir / f"{tag}.stdout", log_dir / f"{tag}.log"
    run = Run(bench.name, workers, argv[1:], str(err_path))
    if bench.script is not None and not bench.script.exists():
        run.reason = f"{bench.script.relative_to(REPO)} not found"
        return run
    t0 = time.monotonic()
    meter = OtherCpu()
    lines: list[str] = []
    with open(out_path, "wb") as out, open(err_path, "w") as err:
        err.write(f"$ {' '.join(argv)}\n")
        err.flush()
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.PIPE, start_new_session=True)
        tee = threading.Thread(target=_tee, args=(proc, err, lines, verbose), daemon=True)
        tee.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            run.reason = f"timeout after {timeout:.0f} s"
        except KeyboardInterrupt:
            stop_group(proc)
            run.reason = "interrupted"
            raise Interrupted from None
        finally:
            tee.join(5)
            run.returncode = proc.returncode
            run.wall_s = round(time.monotonic() - t0, 1)
            run.other_cpu_cores = meter.cores()
            out.flush()
            stdout = out_path.read_text(errors="replace")
    if run.reason:
        return run
    run.result = last_json(stdout)
    if proc.returncode != 0:
        run.reason = f"exit {proc.returncode}: {failure_reason(''.join(lines))}"
    elif run.result is None:
        run.reason = "no JSON result line on stdout"
    else:
        run.ok = True
    return run


def _tee(proc: subprocess.Popen[bytes], log: TextIO, lines: list[str],
         verbose: bool) -> None:
    """The benchmark's stderr into its log (and `lines`; live on ours with --verbose)."""
    assert proc.stderr is not None
    try:
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            lines.append(line)
            log.write(line)
            log.flush()
            if verbose:
                sys.stderr.write("    " + line)
                sys.stderr.flush()
    except (OSError, ValueError):  # the log was closed: a leftover process kept the pipe
        pass


# --- report ----------------------------------------------------------------------------------


def rows_for(bench: Bench, runs: list[Run], quick: bool) -> list[Row]:
    rows: list[Row] = []
    for spec in bench.specs:
        for run in runs:
            res = run.result or {}
            w = "n/a" if run.workers is None else str(run.workers)
            label = label_of(spec, res, quick)
            if not run.ok:
                reason = run.reason if len(run.reason) <= 70 else run.reason[:67] + "..."
                rows.append(Row(label, w, f"failed: {reason}"))
                continue
            try:
                c = spec.cell(res)
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
                rows.append(Row(label, w, f"failed: result has no {exc}"))
                continue
            rows.append(Row(label, w, c.simwire, c.baseline,
                            "-" if c.ratio is None else f"{c.ratio:.2f}x", c.goal,
                            "" if c.met is None else ("yes" if c.met else "NO")))
    return rows


def label_of(spec: Spec, res: dict[str, Any], quick: bool) -> str:
    try:
        return spec.label(res, quick)
    except (KeyError, TypeError, ValueError):
        return spec.label({}, quick)


def print_table(rows: list[Row]) -> None:
    head = Row("measurement", "workers", "Simwire", "baseline", "ratio", "goal", "met")
    cells = [list(asdict(r).values()) for r in [head, *rows]]
    # a failed row's "failed: <reason>" runs on over the empty columns to its right
    w = [max(len(c[i]) for c in cells if not (i == 2 and c[2].startswith("failed: ")))
         for i in range(len(cells[0]))]
    right = {2, 3, 4}
    for n, c in enumerate(cells):
        if c[2].startswith("failed: "):
            print(f"{c[0]:<{w[0]}}  {c[1]:<{w[1]}}  {c[2]}")
            continue
        print("  ".join(f"{v:>{w[i]}}" if i in right and n else f"{v:<{w[i]}}"
                        for i, v in enumerate(c)).rstrip())
        if n == 0:
            print("  ".join("-" * x for x in w))


def machine() -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {"cpus": os.cpu_count(), "cpu_model": model, "mem_mib": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    names = [b.name for b in BENCHES]
    ap = argparse.ArgumentParser(prog="bench/run", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--workers", default="1,2",
                    help="comma-separated worker counts for each benchmark (default 1,2)")
    ap.add_argument("--quick", action="store_true",
                    help="pass --quick to every benchmark (< ~10 min in all)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(names)}")
    ap.add_argument("--out", type=Path,
                    help="raw results JSON file (default: a new temporary directory)")
    ap.add_argument("--timeout-scale", type=float, default=1.0,
                    help="multiply every benchmark's timeout (default 1)")
    ap.add_argument("--verbose", "-v", action="store_true",
                    help="also show each benchmark's progress (stderr) live")
    a = ap.parse_args(argv)
    try:
        workers = [int(w) for w in a.workers.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--workers: not a list of integers: {a.workers!r}")
    if not workers or any(not 1 <= w <= 64 for w in workers):
        ap.error("--workers: counts from 1 to 64")
    only = names if not a.only else [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = set(only) - set(names)
    if unknown:
        ap.error(f"--only: unknown {', '.join(sorted(unknown))} (choose from {', '.join(names)})")
    benches = [b for b in BENCHES if b.name in only]

    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix=f"simwire-bench-run-{stamp}-"))
    log_dir = work / "logs"
    log_dir.mkdir()
    out_path = a.out or work / "results.json"
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %z"), time.monotonic()
    info = {"started": started, "machine": machine(), "commit": git_commit(),
            "argv": sys.argv[1:] if argv is None else argv, "quick": a.quick,
            "workers": workers, "only": only}
    plan = [(b, w) for b in benches for w in (workers if b.per_workers else [None])]
    note(f"{len(plan)} runs ({'quick' if a.quick else 'full'}), logs in {log_dir}")
    runs: dict[str, list[Run]] = {b.name: [] for b in benches}
    interrupted = False
    for n, (bench, w) in enumerate(plan, 1):
        what = bench.name + ("" if w is None else f" --workers {w}")
        timeout = (bench.quick_timeout_s if a.quick else bench.timeout_s) * a.timeout_scale
        if interrupted:
            runs[bench.name].append(Run(bench.name, w, [], "", reason="not run (interrupted)"))
            continue
        note(f"({n}/{len(plan)}) {what}: started (timeout {timeout:.0f} s)")
        try:
            run = run_one(bench, w, a.quick, timeout, log_dir, a.verbose)
        except Interrupted:
            note(f"({n}/{len(plan)}) {what}: interrupted; stopping")
            run = Run(bench.name, w, [], "", reason="interrupted")
            interrupted = True
        runs[bench.name].append(run)
        if run.ok:
            note(f"({n}/{len(plan)}) {what}: done in {run.wall_s:.0f} s")
        elif not interrupted:
            note(f"({n}/{len(plan)}) {what}: FAILED after {run.wall_s:.0f} s: {run.reason} "
                 f"(log {run.log})")
    wall = time.monotonic() - t0

    rows = [r for b in benches for r in rows_for(b, runs[b.name], a.quick)]
    m = info["machine"]
    print(f"Simwire benchmarks (bench/run{' --quick' if a.quick else ''}), {started}, "
          f"commit {info['commit']}")
    print(f"machine: {m['cpus']} CPUs, {m['cpu_model']}, {m['mem_mib']} MiB, Linux "
          f"{m['kernel']}, Python {m['python']}, load average at start "
          f"{' '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}")
    print()
    print_table(rows)
    print()
    others = [f"{r.bench}{'' if r.workers is None else f'/w{r.workers}'} "
              f"{'n/a' if r.other_cpu_cores is None else r.other_cpu_cores}"
              for b in benches for r in runs[b.name] if r.argv]
    print("CPU used by other processes during each run (cores; above ~0.1 skews the "
          "figures): " + ", ".join(others))
    print(f"total wall time {wall / 60:.1f} min ({wall:.0f} s); raw results {out_path}; "
          f"logs {log_dir}")
    doc = {**info, "wall_s": round(wall, 1),
           "runs": [asdict(r) for b in benches for r in runs[b.name]],
           "table": [asdict(r) for r in rows]}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1) + "\n")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
