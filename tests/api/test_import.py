"""`simwire sims import FILE.csv`: valid rows kept, bad rows reported with line numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from simwire.model import Sim
from simwire.ports import Page
from simwire.storage.sqlite import SqliteStore

CSV = """iccid,imsi,ip,imei,label,status
8988280666000000051,901405100000051,10.3.0.51,356938035643809,first,Enabled
8988280666000000052,901405100000052,10.3.0.52,,second,Disabled
12345,901405100000053,10.3.0.53,,bad iccid,Enabled
8988280666000000054,901405100000054,10.3.0.51,,duplicate ip,Enabled
8988280666000000055,901405100000055,10.3.0.55
8988280666000000051,901405100000056,10.3.0.56,,duplicate iccid,Enabled

8988280666000000057,901405100000057,10.3.0.57,,,
"""


def run_import(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "sims.csv"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "simwire.cli", "sims", "import", str(path),
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, check=False,
    )


async def listed(tmp_path: Path) -> Page[Sim]:
    store = await SqliteStore(tmp_path / "data" / "simwire.db").open()
    try:
        return await store.list("default", 1, 100)
    finally:
        await store.close()


async def test_import_keeps_valid_rows_and_reports_bad_ones(tmp_path: Path) -> None:
    result = run_import(tmp_path, CSV)
    assert result.returncode == 1
    assert "imported 3 of 7 rows, 4 rejected" in result.stdout
    errors = [line for line in result.stderr.splitlines() if "sims.csv:" in line]
    assert [e.split("sims.csv:")[1].split(":")[0] for e in errors] == ["4", "5", "6", "7"]
    assert "iccid: must be 19 or 20 digits" in errors[0]
    assert "a SIM with IP 10.3.0.51 already exists" in errors[1]
    assert "expected 6 columns, got 3" in errors[2]
    assert "SIM 8988280666000000051 already exists" in errors[3]
    page = await listed(tmp_path)
    assert [(s.iccid, s.status.value, s.label) for s in page.items] == [
        ("8988280666000000051", "Enabled", "first"),
        ("8988280666000000052", "Disabled", "second"),
        ("8988280666000000057", "Enabled", None),
    ]
    assert "imported rows: 7/7" in result.stderr  # progress, non-tty form


async def test_import_rejects_a_bad_header(tmp_path: Path) -> None:
    result = run_import(tmp_path, "iccid,ip\n8988280666000000051,10.0.0.1\n")
    assert result.returncode == 2
    assert "missing ['imsi']" in result.stderr


async def test_import_of_a_missing_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "simwire.cli", "sims", "import", str(tmp_path / "none.csv"),
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "No such file" in result.stderr
