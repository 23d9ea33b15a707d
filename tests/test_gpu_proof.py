"""The GPU proof's command starts and finishes on the CPU (--smoke): whoever next has a GPU runs a
command known to work. What it measures is for that GPU; here only that every row is reported."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_proof_smoke_reports_every_check_and_timing(tmp_path: Path) -> None:
    out = tmp_path / "gpu_proof.md"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_proof", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = out.read_text()
    for check in (
        "final image finite, not black, not flat",
        "previews arrive",
        "a seed gives the CPU's image",
        "memory back to baseline after 20 requests",
    ):
        assert re.search(rf"\| {re.escape(check)} \| PASS \|", report), (check, report)
    # Timing-bound on a shared CI machine: reported, its verdict is for the GPU run.
    assert re.search(r"\| a cancel frees the device within two steps \| (PASS|FAIL) \| \d+ ms", report)
    assert "| VAE stays float16 | n/a |" in report  # no CUDA here: said, not claimed
    for timing in ("bare diffusers", "ours, no previews", "ours, previews every 5", "ours, previews every step",
                   "Turbo's shape", "num_images: 4, one request", "4 requests of one image"):  # fmt: skip
        assert re.search(rf"\| [^|]*{re.escape(timing)}[^|]* \| \d+\.\d+ s \(\d+\.\d+x bare\) \|", report), timing
