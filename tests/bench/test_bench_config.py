"""``kvtier bench --config`` and ``--plot``: validated before anything runs, overrides said."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kvtier.cli import main

QUICK = ["bench", "--quiet", "--sessions", "4", "--no-reference"]


def run(capsys, *args: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    rc = main([*QUICK, *args])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def test_a_bad_value_is_a_config_error_naming_the_key(capsys) -> None:
    rc, out, err = run(capsys, "--config", '{"cpu_bytes_to_use": "lots"}')
    assert rc == 2 and out == []
    assert "cpu_bytes_to_use: expected an integer" in err and "'lots'" in err
    rc, out, err = run(capsys, "--config", '{"cpu_bytes_to_use": 409600, "cpu_bytes": 1}')
    assert rc == 2 and "cpu_bytes: expected one of the known keys" in err
    rc, out, err = run(capsys, "--config", '{"secondary_tiers": [{"type": "storage", '
                                           '"path": "/tmp/x", "capacity_bytes": 1048576, '
                                           '"fsync": "sometimes"}]}')
    assert rc == 2 and "secondary_tiers[0].fsync" in err
    # a storage tier needs a capacity: the library says so, and so does the bench
    rc, out, err = run(capsys, "--config", '{"secondary_tiers": [{"type": "storage", '
                                           '"path": "/tmp/x"}]}')
    assert rc == 2 and "secondary_tiers[0].capacity_bytes" in err


def test_first_line_says_what_flags_override_and_default_tiers_stay(tmp_path: Path,
                                                                    capsys) -> None:
    report = tmp_path / "r.json"
    rc, out, _ = run(capsys, "--config", '{"cpu_bytes_to_use": 409600, "block_size": 16}',
                     "--cpu-blocks", "50", "--json", str(report))
    assert rc == 0
    first = out[0]
    assert first.startswith("kvtier bench: ")
    assert "--cpu-blocks overrides cpu_bytes_to_use: 409600 -> 204800" in first
    assert "--block-tokens overrides block_size: 16 -> 512" in first
    assert "no secondary_tiers: the default storage tier is replayed" in first
    runs = {r["name"]: r for r in json.loads(report.read_text())["runs"]}
    assert "cpu+storage" in runs and runs["cpu+storage"]["cpu_blocks"] == 50


def test_config_given_in_full_is_replayed_as_given(tmp_path: Path, capsys) -> None:
    report = tmp_path / "r.json"
    cfg = {"cpu_bytes_to_use": 40 * 4096,
           "secondary_tiers": [{"type": "storage", "path": str(tmp_path / "s"),
                                "capacity_bytes": 8 << 20}]}
    rc, out, _ = run(capsys, "--config", json.dumps(cfg), "--json", str(report))
    assert rc == 0 and out[0] == "kvtier bench: --config replayed as given (no flag overrides a value)"
    runs = {r["name"]: r for r in json.loads(report.read_text())["runs"]}
    assert runs["cpu+storage"]["cpu_blocks"] == 40
    assert runs["cpu+storage"]["config"]["secondary_tiers"][0]["capacity_bytes"] == 8 << 20
    rc, out, _ = run(capsys, "--config", json.dumps(cfg), "--tier-blocks", "100")
    assert rc == 0 and out[0].startswith(
        "kvtier bench: --tier-blocks overrides secondary_tiers[0].capacity_bytes: 8388608 -> ")
    rc, out, _ = run(capsys, "--config", '{"secondary_tiers": []}', "--json", str(report))
    assert rc == 0 and {r["name"] for r in json.loads(report.read_text())["runs"]} == {
        "no-offload", "cpu"}


_NO_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # what an install without the plot extra looks like
from kvtier.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_plot_without_matplotlib_fails_before_the_replay(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _NO_MATPLOTLIB, "bench", "--plot", str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stdout == ""  # nothing was replayed
    assert "--plot needs matplotlib" in res.stderr and "kvtier[plot]" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.png").exists()
