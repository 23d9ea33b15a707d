"""Where things live: the contract imports no framework, one module calls the model deployment's
handle, one module tells event types apart. Checked on the source, so a shortcut shows up here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "serve_app").rglob("*.py"), *(REPO / "deployments").rglob("*.py")])


def files_matching(pattern: str) -> set[str]:
    regex = re.compile(pattern)
    return {str(path.relative_to(REPO)) for path in SOURCES if regex.search(path.read_text())}


def test_the_contract_imports_no_framework() -> None:
    """The wire models and the catalog are pydantic only, so every layer (and a client) can import them."""
    code = (
        "import sys, serve_app.contract.errors, serve_app.contract.events, serve_app.contract.queue, "
        "serve_app.contract.requests; print(' '.join(m for m in ('starlette', 'fastapi', 'ray', 'torch') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == ""


def test_only_the_serve_generation_client_calls_the_model_deployment() -> None:
    assert files_matching(r"\.generate\.remote\(|options\(stream=True\)") == {"serve_app/generation/serve.py"}


def test_event_types_are_told_apart_in_one_module() -> None:
    event_class = r"\b(PreviewEvent|ProgressEvent|FinalEvent|ErrorEvent)\b"
    branching = rf"isinstance\([^)]*{event_class}|event\.type\b|event\[\"type\"\]"
    assert files_matching(branching) == {"serve_app/generation/client.py"}
