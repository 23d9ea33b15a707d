"""The README's benchmark commands run and report every ratio (tiny settings: this checks they work,
not what they measure; timings belong to the benchmarks themselves)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.integration.harness import REPO

NUMBER = r"-?\d+\.\d+"


def run_benchmark(module: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own Ray instance
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_overhead_benchmark_reports_every_ratio(tmp_path: Path) -> None:
    out = tmp_path / "overhead.md"
    run_benchmark("benchmarks.overhead", "--reps", "2", "--steps", "3", "--size", "256", "--skip-throughput",
                  "--out", str(out))  # fmt: skip
    report = out.read_text()
    for ratio in (
        r"\(2\) every 5 / \(1\)",
        r"\(2'\) every step / \(1\)",
        r"\(3\) Serve SSE / \(1\)",
        r"\(3\) Serve SSE / \(4\) reference",
        r"\(3\) Serve SSE / \(3'\) POST / with the same body",
        r"\(3''\) one preview / \(3'\) POST /",
        r"\(7\) image to image / \(2\) no previews, same steps",
        r"\(8\) a LoRA loaded / \(2\) no previews",
        r"\(9\) a LoRA loaded first / \(8\) loaded",
        r"time to first event \(3\) - one step, ms",
        r"time to first event \(4\) - one step, ms",
    ):
        assert re.search(rf"\| {ratio} \| {NUMBER} \| {NUMBER} \|", report), ratio
    assert re.search(rf"\| \(9\) - \(8\): a first load, s \| {NUMBER} \|\s+\|", report)
    serve_row = re.search(rf"\| Serve SSE end to end \(3\) \|( {NUMBER} \|){{4}} ({NUMBER}) \|", report)
    assert serve_row and float(serve_row.group(2)) > 0  # the first event's time, seen by the client


def test_preview_cost_compares_tiny_and_full_size_sdxl(tmp_path: Path) -> None:
    out = tmp_path / "preview_cost.md"
    run_benchmark("benchmarks.preview_cost", "--size", "256", "--out", str(out))
    report = out.read_text()
    shares = dict(re.findall(r"\| (tiny, 256px, FLOPs|SDXL \+ TAESDXL, 1024px, FLOPs) \| (\d+\.\d)% \|", report))
    assert len(shares) == 2, report
    # A TAESD decode is a few percent of an SDXL step's compute: the premise of cheap previews.
    assert 1.0 < float(shares["SDXL + TAESDXL, 1024px, FLOPs"]) < 10.0, report


def test_request_cost_reports_each_small_request_beside_plain_fastapi(tmp_path: Path) -> None:
    out = tmp_path / "request_cost.md"
    run_benchmark("benchmarks.request_cost", "--requests", "40", "--repeats", "1", "--small-only",
                  "--skip-slowdown", "--out", str(out))  # fmt: skip
    report = out.read_text()
    rows = (
        r"plain FastAPI `GET /health`",
        r"`GET /health` via Serve's proxy",
        r"queue status poll via proxy",
        r"`GET /health` via the status port",
        r"queue status poll via the status port",
    )
    for row in rows:
        # A ratio, or on a busy machine "n/a" when the plain row vanished into the idle noise subtracted
        assert re.search(rf"\| {row}[^|]*\|.*\| {NUMBER} \| ({NUMBER}x|n/a \([^)]*\)) \|", report), row


def test_queue_previews_benchmark_compares_previews_off_on_and_watched() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.queue_previews", "--rounds", "1", "--steps", "4", "--size", "128",
         "--preview-interval", "2"],
        cwd=REPO, env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = dict(re.findall(rf"(previews [a-z ,]+?)\s+median {NUMBER} s .* median / off ({NUMBER})", result.stdout))
    assert set(rows) == {"previews off", "previews on, nobody watching", "previews on, one viewer"}, result.stdout
    assert float(rows["previews off"]) == 1.0
    watched = re.search(r"one viewer .* previews seen (\d+)", result.stdout)
    assert watched and int(watched.group(1)) >= 1  # the viewer's stream carried previews
