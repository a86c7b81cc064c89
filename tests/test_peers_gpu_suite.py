"""Smoke tests of the two benchmark commands: the GPU suite's CPU dry run and the peers' quick mode.

Each runs its script end to end in a subprocess (as CI and a person would) and reads the JSON
it writes. About 40 s together on a 2-core CPU, most of it the dry run's two-process DDP step.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

GPU_SUITE_ROWS = [
    "sample_eager_fp32_b1", "sample_eager_fp32_b2", "sample_bf16_autocast_b1", "sample_bf16_autocast_b2",
    "sample_onnx_cuda_b1", "sample_onnx_cuda_b2", "ar_kv_b1", "ar_kv_b2", "ar_uncached_b1", "ar_uncached_b2",
    "train_step_bf16", "sample_compile_b1", "sample_compile_b2", "ddp_two_process_step",
]


def run(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_gpu_suite_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "suite.json"
    done = run("gpu_suite.py", "--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == GPU_SUITE_ROWS
    errors = {name: row["why"] for name, row in rows.items() if row["status"] == "error"}
    assert not errors, errors
    for name in GPU_SUITE_ROWS:
        if name.startswith("sample_onnx") and importlib.util.find_spec("onnxruntime") is None:
            assert rows[name]["status"] == "skipped"
            continue
        assert rows[name]["status"] == ("estimated" if name.startswith("ar_uncached") else "measured"), rows[name]
    for batch in (1, 2):
        onnx = rows[f"sample_onnx_cuda_b{batch}"]
        if onnx["status"] == "measured":
            assert onnx["parity"] is True and onnx["tokens_equal_greedy"] == 1.0 and onnx["io_binding"] is True
        assert rows[f"sample_eager_fp32_b{batch}"]["seconds_per_image"] > 0
        assert "estimated" in rows[f"ar_uncached_b{batch}"]["how"]
    train = rows["train_step_bf16"]
    assert train["flops_per_step"] > 0 and 0 < train["mfu"] and train["peak_source"].startswith("measured")
    assert rows["ddp_two_process_step"]["processes"] == 2


def test_gpu_suite_never_overwrites_without_flag(tmp_path):
    out = tmp_path / "suite.json"
    out.write_text("keep me")
    done = run("gpu_suite.py", "--dry-run", "--out", str(out), timeout=60)
    assert done.returncode == 2 and "--overwrite" in done.stderr
    assert out.read_text() == "keep me"


def test_peers_quick_reports_emage_and_each_peer(tmp_path):
    out = tmp_path / "peers.json"
    done = run("peers.py", "--quick", "--threads", "1", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["model"]: row for row in report["results"]}
    emage = rows["Emage"]
    assert emage["status"] == "measured" and emage["pixels_s"] >= emage["loop_s"] > 0
    assert emage["loop_included_text"] is False  # the text stage answered every encode_text call of the loop
    assert report["models"]["tiny"]["Emage"]["flops"]["round"] > 0
    assert "| tiny | 1 | 12 | off |" in done.stdout
    peers = {name: rows[name] for name in ("aMUSEd", "Muse")}
    if all(row["status"] == "not installed" for row in peers.values()):
        pytest.skip("no peer installed (pip install --no-deps -r requirements-peers.txt)")
    for name, row in peers.items():
        assert row["status"] in ("measured", "not installed"), (name, row.get("why"))
        if row["status"] == "measured":
            assert row["pixels_s"] >= row["loop_s"] > 0 and row["loop_cpu_s"] > 0
            assert report["models"]["tiny"][name]["parameters"]["transformer"] > 0
    measured = [r for r in report["ratios"] if r["ratio"] is not None]
    assert {r["mode"] for r in measured} == {"pixels", "loop"}
