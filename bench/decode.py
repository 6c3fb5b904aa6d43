"""Energy Saver decode benchmark: Simwire's compiled BCL decoders against hand-written ones.

    .venv/bin/python -m bench.decode [--seconds S] [--rounds N] [--json] [--quick]

Measures decodes/s of `Codec(bcl.parse(template)).decode(payload)` (energy_saver.codec) for
templates of the shared vectors (../shared/spec/vectors/bcl.json relative to the repo root):

- sdk_demo, payload 016354322e322e31 (switch on byte 0, case 1: a constant, two uint8, a
  5-byte string);
- vehicle, payloads 00424bbcf940de981c0078 (case 0: two float32 BE and an int16 BE under a
  nested key) and 01ffffff (the default branch: a constant);
- features, payload 001a003700 (no switch: two int16 BE and a boolean).

Each is timed next to its baseline in the same run: a hand-written decoder for the same
layout, as a competent engineer would write it (`if b[0] == ...`, one precompiled
`struct.Struct.unpack_from`, a dict literal) producing exactly Simwire's output, `(value,
None)` with the same keys in the same order, strings right-stripped of NUL and decoded as
UTF-8 with errors="replace", float32 values through `js_number(f32_shortest(x))`. Every
decoder's output is asserted identical (JSON text and ==) on every vector case of these
templates before timing. Goal (the issue): Simwire >= 0.5x the hand-written decoder.

For context only (no goal): construct's own compiled parser for the same layout
(`construct.Struct(...).compile().parse(payload)`, plus the same conversion to the output
dict) -- what ADR 0006 chose not to put on the hot path.

Timing: `time.perf_counter` around loops of 10 unrolled calls, garbage collector off during
a loop (like timeit). Loop sizes are calibrated to ~--seconds (0.2) per decoder per round;
--rounds (5) rounds alternate over every decoder (order reversed every other round), and
each decoder's figure is the median of its rounds; ratios are computed from the medians.
Default run ~15 s, --quick (3 rounds x ~0.1 s) ~6 s. Output: a table, then one summary
line per template; --json prints one JSON object per row instead (then one per template
summary). Either way the last line is one JSON object, `"kind": "result"`: the worst
Simwire / hand-written ratio over every payload, that payload's two rates, the goal.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import construct as cs

from energy_saver import bcl
from energy_saver.codec import Codec, f32_shortest, js_number

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(REPO))
from bench.ingest import git_commit  # noqa: E402

VECTORS = REPO.parent / "shared/spec/vectors/bcl.json"
GOAL = 0.5
UNROLL = 10

Decoded = tuple[dict[str, Any], Any]
Decoder = Callable[[bytes], Decoded]

SIMWIRE = "simwire"
HAND = "hand-written"
CONSTRUCT = "construct compiled Struct"

# (template, payload hex) timed, in this order
TIMED = [
    ("sdk_demo", "016354322e322e31"),
    ("vehicle", "00424bbcf940de981c0078"),
    ("vehicle", "01ffffff"),
    ("features", "001a003700"),
]


# --- hand-written decoders --------------------------------------------------------------------
# What an engineer would write for each layout. A payload too short raises struct.error or
# IndexError (Simwire raises DecodeError with 1NCE's text; that path is not timed).

_DEMO = struct.Struct("<BB5s")  # battery_level, signal_strength, software_version at byte 1
_VEHICLE = struct.Struct(">ffh")  # lat, lon, speed at byte 1
_FEATURES = struct.Struct(">hh?")  # Temperature, Humidity, Switch at byte 0


def hand_sdk_demo(b: bytes) -> Decoded:
    if b[0] == 1:
        battery, signal, version = _DEMO.unpack_from(b, 1)
        return {"data_type": "Energy_Saver", "battery_level": battery,
                "signal_strength": signal,
                "software_version": version.rstrip(b"\0").decode("utf-8", "replace")}, None
    return {}, None


def hand_vehicle(b: bytes) -> Decoded:
    if b[0] == 0:
        lat, lon, speed = _VEHICLE.unpack_from(b, 1)
        return {"gps": {"lat": js_number(f32_shortest(lat)),
                        "lon": js_number(f32_shortest(lon))}, "speed": speed}, None
    return {"error": "unknown payload"}, None


def hand_features(b: bytes) -> Decoded:
    temperature, humidity, switch = _FEATURES.unpack_from(b, 0)
    return {"Temperature": temperature, "Humidity": humidity, "Switch": switch}, None


# --- construct's compiled parser (context) ----------------------------------------------------

_CS_DEMO = cs.Struct(
    "type" / cs.Int8sb,
    "data" / cs.Switch(cs.this.type, {1: cs.Struct(
        "battery_level" / cs.Int8ub, "signal_strength" / cs.Int8ub,
        "software_version" / cs.Bytes(5))}, cs.Pass),
).compile()
_CS_VEHICLE = cs.Struct(
    "type" / cs.Int8sb,
    "data" / cs.Switch(cs.this.type, {0: cs.Struct(
        "lat" / cs.Float32b, "lon" / cs.Float32b, "speed" / cs.Int16sb)}, cs.Pass),
).compile()
_CS_FEATURES = cs.Struct(
    "Temperature" / cs.Int16sb, "Humidity" / cs.Int16sb, "Switch" / cs.Flag,
).compile()


def construct_sdk_demo(b: bytes) -> Decoded:
    d = _CS_DEMO.parse(b)["data"]
    if d is None:
        return {}, None
    return {"data_type": "Energy_Saver", "battery_level": d["battery_level"],
            "signal_strength": d["signal_strength"],
            "software_version": d["software_version"].rstrip(b"\0").decode("utf-8", "replace")
            }, None


def construct_vehicle(b: bytes) -> Decoded:
    d = _CS_VEHICLE.parse(b)["data"]
    if d is None:
        return {"error": "unknown payload"}, None
    return {"gps": {"lat": js_number(f32_shortest(d["lat"])),
                    "lon": js_number(f32_shortest(d["lon"]))}, "speed": d["speed"]}, None


def construct_features(b: bytes) -> Decoded:
    c = _CS_FEATURES.parse(b)
    return {"Temperature": c["Temperature"], "Humidity": c["Humidity"],
            "Switch": c["Switch"]}, None


BASELINES: dict[str, dict[str, Decoder]] = {
    "sdk_demo": {HAND: hand_sdk_demo, CONSTRUCT: construct_sdk_demo},
    "vehicle": {HAND: hand_vehicle, CONSTRUCT: construct_vehicle},
    "features": {HAND: hand_features, CONSTRUCT: construct_features},
}


# --- checks ----------------------------------------------------------------------------------


def load_vectors(path: Path) -> dict[str, dict[str, Any]]:
    vectors = json.loads(path.read_text())["vectors"]
    return {v["name"]: v for v in vectors if v["name"] in BASELINES}


def check(name: str, vector: dict[str, Any], decoders: dict[str, Decoder]) -> None:
    """Every decoder gives Simwire's exact output (same JSON text: key order, int/float/bool)
    on every vector case with an expected value, and fails on every error case."""
    for case in vector["cases"]:
        payload = bytes.fromhex(case["payload"])
        if "expected" not in case:
            for dname, fn in decoders.items():
                try:
                    fn(payload)
                except (ValueError, IndexError, struct.error, cs.ConstructError):
                    continue
                raise AssertionError(f"{name} {case['payload']}: {dname} did not fail")
            continue
        want = decoders[SIMWIRE](payload)
        if want[0] != case["expected"]:
            raise AssertionError(f"{name} {case['payload']}: simwire gave {want[0]!r}, "
                                 f"the vector expects {case['expected']!r}")
        for dname, fn in decoders.items():
            got = fn(payload)
            if got != want or json.dumps(got) != json.dumps(want):
                raise AssertionError(f"{name} {case['payload']}: {dname} gave {got!r}, "
                                     f"simwire {want!r}")


# --- timing ----------------------------------------------------------------------------------


@dataclass
class Row:
    template: str
    payload: str
    decoder: str
    fn: Decoder
    data: bytes
    loops: int = 0
    """Iterations of UNROLL calls per round."""
    rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def spread_pct(self) -> float:
        return 100 * (max(self.rates) - min(self.rates)) / self.rate


def timed(fn: Decoder, b: bytes, loops: int) -> float:
    """Seconds for loops x UNROLL calls of fn(b), garbage collector off."""
    gc_on = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in repeat(None, loops):
            fn(b)
            fn(b)
            fn(b)
            fn(b)
            fn(b)
            fn(b)
            fn(b)
            fn(b)
            fn(b)
            fn(b)
        return time.perf_counter() - t0
    finally:
        if gc_on:
            gc.enable()


def calibrate(row: Row, seconds: float) -> None:
    """Loops giving ~seconds per round (doubling until a run lasts >= 0.05 s or seconds/4)."""
    loops = 1
    floor = min(0.05, seconds / 4)
    while True:
        t = timed(row.fn, row.data, loops)
        if t >= floor:
            break
        loops *= 2
    row.loops = max(1, round(loops * seconds / t))


class OtherCpu:
    """Cores used by everything but this process between two /proc/stat snapshots (Linux)."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = self._busy()
        self._ours0 = self._ours()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        t = os.times()
        return t.user + t.system

    def cores(self) -> float | None:
        busy = self._busy()
        wall = time.monotonic() - self._t0
        if busy is None or self._busy0 is None or wall <= 0:
            return None
        other = (busy - self._busy0) - (self._ours() - self._ours0)
        return round(max(0.0, other) / wall, 2)


# --- report ----------------------------------------------------------------------------------


def ratios(rows: list[Row]) -> dict[tuple[str, str, str], float]:
    hand = {(r.template, r.payload): r.rate for r in rows if r.decoder == HAND}
    return {(r.template, r.payload, r.decoder): r.rate / hand[(r.template, r.payload)]
            for r in rows}


def summaries(rows: list[Row], ratio: dict[tuple[str, str, str], float]
              ) -> list[dict[str, Any]]:
    """Per template: Simwire / hand-written, the worst of its payloads."""
    out = []
    for template in dict.fromkeys(r.template for r in rows):
        per = {r.payload: ratio[(r.template, r.payload, SIMWIRE)] for r in rows
               if r.template == template and r.decoder == SIMWIRE}
        worst = min(per.values())
        out.append({"kind": "summary", "template": template, "ratio": round(worst, 3),
                    "per_payload": {p: round(v, 3) for p, v in per.items()}, "goal": GOAL,
                    "goal_met": worst >= GOAL})
    return out


def report(rows: list[Row], args: argparse.Namespace, wall_s: float,
           other_cpu: float | None) -> None:
    ratio = ratios(rows)
    summary = summaries(rows, ratio)
    if args.json:
        for r in rows:
            print(json.dumps({
                "kind": "row", "template": r.template, "payload": r.payload,
                "decoder": r.decoder, "decodes_per_s": round(r.rate),
                "ratio_vs_hand_written": round(ratio[(r.template, r.payload, r.decoder)], 3),
                "rounds_per_s": [round(x) for x in r.rates],
                "calls_per_round": r.loops * UNROLL}))
        for s in summary:
            print(json.dumps({**s, "params": {
                "rounds": args.rounds, "seconds": args.seconds, "cpus": os.cpu_count(),
                "python": platform.python_version(), "construct": cs.__version__,
                "commit": git_commit(), "other_cpu_cores": other_cpu,
                "wall_s": round(wall_s, 1)}}))
        print_result(rows, ratio, summary, args, wall_s, other_cpu)
        return
    print(f"Simwire BCL decode benchmark: {args.rounds} rounds x ~{args.seconds:g} s per "
          f"decoder, median per decoder; Python {platform.python_version()}, construct "
          f"{cs.__version__}, {os.cpu_count()} CPUs, commit {git_commit()}, wall "
          f"{wall_s:.0f} s, CPU used by other processes {other_cpu} cores")
    head = ("template", "payload", "decoder", "decodes/s", "vs hand-written", "spread")
    cells = [(r.template, r.payload, r.decoder, f"{r.rate:,.0f}",
              f"{ratio[(r.template, r.payload, r.decoder)]:.2f}", f"{r.spread_pct:.0f} %")
             for r in rows]
    w = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    for c in [head, *cells]:
        print(f"{c[0]:<{w[0]}}  {c[1]:<{w[1]}}  {c[2]:<{w[2]}}  {c[3]:>{w[3]}}  "
              f"{c[4]:>{w[4]}}  {c[5]:>{w[5]}}")
    for s in summary:
        detail = ""
        if len(s["per_payload"]) > 1:
            detail = "; worst of " + ", ".join(f"{p} {v:.2f}" for p, v in
                                               s["per_payload"].items())
        print(f"{s['template']}: simwire/hand-written = {s['ratio']:.2f} (goal >= {GOAL}: "
              f"{'MET' if s['goal_met'] else 'NOT MET'}{detail})")
    print_result(rows, ratio, summary, args, wall_s, other_cpu)


def print_result(rows: list[Row], ratio: dict[tuple[str, str, str], float],
                 summary: list[dict[str, Any]], args: argparse.Namespace, wall_s: float,
                 other_cpu: float | None) -> None:
    """The last line: one JSON object for bench/run (the worst payload decides)."""
    rate = {(r.template, r.payload, r.decoder): r.rate for r in rows}
    t, p = min(((r.template, r.payload) for r in rows if r.decoder == SIMWIRE),
               key=lambda tp: ratio[(tp[0], tp[1], SIMWIRE)])
    worst = ratio[(t, p, SIMWIRE)]
    print(json.dumps({
        "kind": "result", "ratio": round(worst, 3), "goal": GOAL, "goal_met": worst >= GOAL,
        "worst": {"template": t, "payload": p, "simwire_per_s": round(rate[(t, p, SIMWIRE)]),
                  "hand_written_per_s": round(rate[(t, p, HAND)])},
        "rows": [{"template": r.template, "payload": r.payload, "decoder": r.decoder,
                  "decodes_per_s": round(r.rate),
                  "ratio_vs_hand_written": round(ratio[(r.template, r.payload, r.decoder)], 3)}
                 for r in rows],
        "templates": summary,
        "params": {"rounds": args.rounds, "seconds": args.seconds, "cpus": os.cpu_count(),
                   "python": platform.python_version(), "construct": cs.__version__,
                   "commit": git_commit(), "other_cpu_cores": other_cpu},
        "wall_s": round(wall_s, 1)}, separators=(",", ":")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float,
                    help="target seconds per decoder per round (default 0.2, quick 0.1)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 5, quick 3)")
    ap.add_argument("--quick", action="store_true", help="3 rounds x ~0.1 s (~6 s)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--vectors", type=Path, default=VECTORS, help=f"default {VECTORS}")
    args = ap.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.1 if args.quick else 0.2
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.seconds <= 0 or args.rounds < 1:
        ap.error("--seconds must be > 0 and --rounds >= 1")
    vectors = load_vectors(args.vectors)
    rows: list[Row] = []
    for name, vector in vectors.items():
        decoders: dict[str, Decoder] = {
            SIMWIRE: Codec(bcl.parse(vector["template"])).decode, **BASELINES[name]}
        check(name, vector, decoders)
        for template, payload in TIMED:
            if template == name:
                rows += [Row(name, payload, d, fn, bytes.fromhex(payload))
                         for d, fn in decoders.items()]
    missing = {t for t, _ in TIMED} - set(vectors)
    if missing:
        ap.error(f"{args.vectors}: no vector named {', '.join(sorted(missing))}")
    rows.sort(key=lambda r: [(t, p) for t, p in TIMED].index((r.template, r.payload)))
    t0 = time.monotonic()
    other = OtherCpu()
    for row in rows:
        calibrate(row, args.seconds)
    for k in range(args.rounds):
        for row in rows if k % 2 == 0 else reversed(rows):
            row.rates.append(row.loops * UNROLL / timed(row.fn, row.data, row.loops))
    report(rows, args, time.monotonic() - t0, other.cores())
    return 0


if __name__ == "__main__":
    sys.exit(main())
