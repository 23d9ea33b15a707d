"""The clients people already use, the CLI, request ids, CORS, OpenAPI and metrics."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import yaml
from PIL import Image

from sdxl_client.dev_cert import write_localhost_certificate
from tests.integration.harness import REPO, ServeHarness, decode_image, free_port

SMALL = {"prompt": "a red fox", "width": 256, "height": 256, "num_inference_steps": 6, "seed": 3}
JS_DIR = REPO / "tests" / "js"


# --- Python fal_client, unmodified, over HTTPS --------------------------------------------------


@pytest.fixture(scope="module")
def tls_service(tmp_path_factory: pytest.TempPathFactory, tiny_adapters: Path):
    """`serve run configs/local-tls.yaml` as a user runs it (own Ray instance), on a free port; the tiny adapters
    in its default adapter directory (the environment's `SDXL_SERVE_CACHE`)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = write_localhost_certificate(directory)
    config = yaml.safe_load((REPO / "configs" / "local-tls.yaml").read_text())
    port = free_port()
    config["http_options"].update(port=port, ssl_certfile=str(cert), ssl_keyfile=str(key))
    # A second app whose generations run past a 1 s deadline: a stream that fails after it started.
    failing = copy.deepcopy({**config["applications"][0], "name": "deadline", "route_prefix": "/local/deadline"})
    failing["args"]["requests"] = {"timeout_s": 1}
    for deployment in failing["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0}  # `serve run` counts this machine's 2 cores
    config["applications"].append(failing)
    config_path = directory / "local-tls.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a separate Ray instance
    log = (directory / "serve.log").open("w")
    process = subprocess.Popen(
        [shutil.which("serve") or "serve", "run", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"https://localhost:{port}"
    deadline = time.monotonic() + 180
    with httpx.Client(verify=str(cert)) as client:
        while time.monotonic() < deadline:
            try:
                if client.get(f"{base}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (directory / "serve.log").read_text()[-3000:]
            time.sleep(1)
        else:
            raise TimeoutError((directory / "serve.log").read_text()[-3000:])
    yield {"host": f"localhost:{port}", "cert": cert}
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def run_fal_client(tls_service: dict, code: str) -> dict:
    """Run fal_client in a fresh interpreter configured only through its documented environment."""
    env = {
        **os.environ,
        "FAL_RUN_HOST": tls_service["host"],
        "FAL_QUEUE_RUN_HOST": f"{tls_service['host']}/queue",  # queue.localhost does not resolve
        "FAL_KEY": "local-key",
        "SSL_CERT_FILE": str(tls_service["cert"]),
    }
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def fetch_image(tls_service: dict, url: str) -> Image.Image:
    """A queue result's image, by the URL the service gave (on the host the client called)."""
    assert url.startswith(f"https://{tls_service['host']}/files/")
    response = httpx.get(url, verify=str(tls_service["cert"]))
    return Image.open(io.BytesIO(response.content))


SUBSCRIBE = """
import fal_client, json
updates = []
result = fal_client.subscribe("local/sdxl", arguments=ARGS, with_logs=True, on_queue_update=updates.append)
logs = [log["message"] for update in updates for log in (getattr(update, "logs", None) or [])]
print(json.dumps({"result": result, "updates": [type(update).__name__ for update in updates], "logs": logs}))
"""

SUBSCRIBE_ASYNC = """
import asyncio, fal_client, json
async def main():
    updates = []
    result = await fal_client.subscribe_async(
        "local/sdxl", arguments=ARGS, with_logs=True, on_queue_update=updates.append
    )
    return {"result": result, "updates": [type(update).__name__ for update in updates]}
print(json.dumps(asyncio.run(main())))
"""


@pytest.mark.parametrize("code", [SUBSCRIBE, SUBSCRIBE_ASYNC], ids=["sync", "async"])
def test_fal_client_subscribe(tls_service: dict, code: str) -> None:
    """fal's own example, unchanged: subscribe polls the queue with logs and returns the result."""
    # Long enough to be seen running: a job done between two polls goes from Queued to Completed, as on fal.
    out = run_fal_client(tls_service, code.replace("ARGS", repr({**SMALL, "num_inference_steps": 30})))
    assert out["result"]["seed"] == 3
    assert fetch_image(tls_service, out["result"]["images"][0]["url"]).size == (256, 256)
    assert "InProgress" in out["updates"] and out["updates"][-1] == "Completed"
    if "logs" in out:
        assert "step 30/30" in out["logs"]


def test_fal_client_queue_handle_status_events_result_and_cancel(tls_service: dict) -> None:
    long = {**SMALL, "num_inference_steps": 50, "width": 512, "height": 512}
    out = run_fal_client(
        tls_service,
        f"""
import fal_client, json, time
handle = fal_client.submit("local/sdxl", arguments={SMALL!r})
first = type(handle.status(with_logs=True)).__name__
events = [type(event).__name__ for event in handle.iter_events(with_logs=True)]
result = handle.get()
slow = fal_client.submit("local/sdxl", arguments={long!r})
while not isinstance(slow.status(), fal_client.InProgress):
    time.sleep(0.1)
slow.cancel()
try:
    slow.get()
    error = None
except fal_client.FalClientHTTPError as failure:
    error = [failure.status_code, failure.error_type, failure.message]
print(json.dumps({{"first": first, "events": events, "seed": result["seed"], "error": error,
                  "final": type(slow.status()).__name__}}))
""",
    )
    assert out["first"] in ("Queued", "InProgress", "Completed")
    assert out["events"][-1] == "Completed" and out["seed"] == 3
    assert out["error"][:2] == [400, "cancelled"]
    assert out["final"] == "Completed"


def test_fal_client_priority_and_start_timeout(tls_service: dict) -> None:
    """`priority="low"` waits behind a normal job submitted after it; `start_timeout=` ends a job that
    could not start in time as fal ends it: 504 with the user-timeout header, which fal_client does not
    retry, and it never runs."""
    long = {**SMALL, "num_inference_steps": 50, "width": 512, "height": 512}
    out = run_fal_client(
        tls_service,
        f"""
import fal_client, json, time
busy = [fal_client.submit("local/sdxl", arguments={long!r}) for _ in range(2)]  # running, and waiting for it
while not isinstance(busy[0].status(), fal_client.InProgress):
    time.sleep(0.1)
low = fal_client.submit("local/sdxl", arguments={SMALL!r}, priority="low")
normal = fal_client.submit("local/sdxl", arguments={SMALL!r}, priority="normal")
deadline = time.monotonic() + 5  # positions come from a mirror that may lag the submit by a poll
while True:
    positions = {{"low": low.status().position, "normal": normal.status().position}}
    if positions["normal"] < positions["low"] or time.monotonic() > deadline:
        break
    time.sleep(0.1)
late = fal_client.submit("local/sdxl", arguments={SMALL!r}, start_timeout=1.5)
try:
    late.get()
    timed_out = None
except fal_client.FalClientHTTPError as failure:
    timed_out = [failure.status_code, failure.error_type, failure.response.headers.get("x-fal-request-timeout-type")]
logs = [log["message"] for log in late.status(with_logs=True).logs]
for handle in busy:
    handle.cancel()
order = []
for name, handle in (("low", low), ("normal", normal)):
    handle.get()
    order.append((handle.status(with_logs=True).logs[-1]["timestamp"], name))
print(json.dumps({{"positions": positions, "timed_out": timed_out, "late_logs": logs,
                  "finished": [name for _, name in sorted(order)]}}))
""",
    )
    assert out["positions"]["normal"] < out["positions"]["low"]
    assert out["finished"] == ["normal", "low"]
    assert out["timed_out"] == [504, "start_timeout", "user"]
    assert "Started" not in out["late_logs"]


def test_fal_client_object_lifecycle_preference(tls_service: dict) -> None:
    """fal_client passes X-Fal-Object-Lifecycle-Preference as a header: the result's image is served
    until then, and answers 404 after."""
    out = run_fal_client(
        tls_service,
        f"""
import fal_client, json
lifecycle = {{"X-Fal-Object-Lifecycle-Preference": json.dumps({{"expiration_duration_seconds": 4}})}}
handle = fal_client.submit("local/sdxl", arguments={SMALL!r}, headers=lifecycle)
print(json.dumps({{"url": handle.get()["images"][0]["url"]}}))
""",
    )
    fresh = httpx.get(out["url"], verify=str(tls_service["cert"]))
    time.sleep(5)
    expired = httpx.get(out["url"], verify=str(tls_service["cert"]))
    assert fresh.status_code == 200 and fresh.headers["content-type"] == "image/jpeg"
    assert expired.status_code == 404 and expired.headers["x-fal-error-type"] == "not_found"


def test_fal_client_stream(tls_service: dict) -> None:
    events = run_fal_client(
        tls_service,
        "import fal_client, json\n"
        f"events = list(fal_client.stream('local/sdxl', arguments={SMALL!r}))\n"
        "print(json.dumps(events))",
    )
    assert [event["type"] for event in events] == ["preview", "preview", "final"]
    assert [event["step"] for event in events[:-1]] == [0, 5]
    assert decode_image(events[-1]["image"]).size == (256, 256)
    assert events[-1]["seed"] == 3


def test_fal_client_stream_raises_after_an_error_event(tls_service: dict) -> None:
    """The error event arrives as the last event, then the cut-off body makes the client raise."""
    slow = {**SMALL, "num_inference_steps": 50, "width": 512, "height": 512, "preview_interval": 1}
    out = run_fal_client(
        tls_service,
        f"""
import fal_client, json
events = []
try:
    for event in fal_client.stream("local/deadline", arguments={slow!r}):
        events.append(event)
    raised = None
except Exception as error:
    raised = type(error).__name__
print(json.dumps({{"raised": raised, "last": events[-1] if events else None}}))
""",
    )
    assert out["raised"] == "RemoteProtocolError"
    assert out["last"]["error_type"] == "deadline_exceeded"


def test_fal_client_sends_fast_sdxl_fields_as_fal_documents_them(tls_service: dict) -> None:
    """fal's fast-sdxl fields through fal_client, as its docs show them (a float seed from Python's json)."""
    arguments = {"prompt": "a red fox", "image_size": {"width": 256, "height": 256}, "num_images": 2,
                 "num_inference_steps": 3, "seed": 42.0, "format": "png", "enable_safety_checker": True,
                 "expand_prompt": False, "loras": [], "sync_mode": True}  # fmt: skip
    out = run_fal_client(
        tls_service,
        f"import fal_client, json\nprint(json.dumps(fal_client.subscribe('local/sdxl', arguments={arguments!r})))",
    )
    assert out["seed"] == 42 and out["has_nsfw_concepts"] == [None, None]  # no checker configured: no claim
    assert [decode_image(image).size for image in out["images"]] == [(256, 256), (256, 256)]
    assert {image["content_type"] for image in out["images"]} == {"image/png"}


def test_fal_client_run(tls_service: dict) -> None:
    result = run_fal_client(
        tls_service,
        f"import fal_client, json\nprint(json.dumps(fal_client.run('local/sdxl', arguments={SMALL!r})))",
    )
    assert result["seed"] == 3
    assert decode_image(result["images"][0]).size == (256, 256)


IMAGE_TO_IMAGE = """
import fal_client, json
from PIL import Image
image_url = fal_client.encode_image(Image.radial_gradient("L").convert("RGB").resize((320, 256)), format="png")
result = fal_client.subscribe("local/sdxl/image-to-image", arguments={**ARGS, "image_url": image_url, "strength": 0.5})
ran = fal_client.run("local/sdxl/image-to-image", arguments={**ARGS, "image_url": image_url, "strength": 0.5})
print(json.dumps({"result": result, "ran": ran}))
"""


def test_fal_client_image_to_image_with_an_encoded_image(tls_service: dict) -> None:
    """fal's way for Python: `encode_image` makes a data URI, then `subscribe` (and `run`) on the
    endpoint's subpath; status, result and cancel stay under the app id, as fal_client builds them."""
    arguments = {"prompt": "a red fox", "num_inference_steps": 8, "seed": 3}  # no size: the input's
    out = run_fal_client(tls_service, IMAGE_TO_IMAGE.replace("ARGS", repr(arguments)))
    assert out["result"]["seed"] == 3
    assert fetch_image(tls_service, out["result"]["images"][0]["url"]).size == (320, 256)  # the input's size
    assert decode_image(out["ran"]["images"][0]).size == (320, 256)


LORAS = """
import fal_client, json
styled = {**ARGS, "loras": [{"path": "tiny-style.safetensors", "scale": 1.0}]}
base = fal_client.run("local/sdxl", arguments=ARGS)["images"][0]
ran = fal_client.run("local/sdxl", arguments=styled)["images"][0]
subscribed = fal_client.subscribe("local/sdxl", arguments={**styled, "sync_mode": True})["images"][0]
embedded = fal_client.run("local/sdxl", arguments={**ARGS, "embeddings": [{"path": "tiny-embedding.safetensors"}]})
after = fal_client.run("local/sdxl", arguments=ARGS)["images"][0]
try:
    fal_client.run("local/sdxl", arguments={**ARGS, "loras": [{"path": "missing.safetensors"}]})
    refused = None
except fal_client.client.FalClientHTTPError as error:
    refused = {"status": error.status_code, "body": error.response.json()}
print(json.dumps({"base": base, "ran": ran, "subscribed": subscribed, "embedded": embedded["images"][0],
                  "after": after, "refused": refused}))
"""


def test_fal_client_sends_loras_and_embeddings(tls_service: dict) -> None:
    """`loras` and `embeddings` from the unmodified fal_client, on run and through the queue: the LoRA changes
    the image, the same LoRA gives the same image both ways, and the next request without one is as before."""
    arguments = {**SMALL, "prompt": "a <s0><s1> fox", "width": 128, "height": 128, "output_format": "png"}
    out = run_fal_client(tls_service, LORAS.replace("ARGS", repr(arguments)))
    pixels = {
        name: np.asarray(decode_image(out[name]), np.int16)
        for name in ("base", "ran", "subscribed", "embedded", "after")
    }
    assert np.abs(pixels["ran"] - pixels["base"]).mean() > 2 and np.abs(pixels["embedded"] - pixels["base"]).mean() > 1
    assert np.array_equal(pixels["subscribed"], pixels["ran"]) and np.array_equal(pixels["after"], pixels["base"])
    assert out["refused"]["status"] == 422
    assert out["refused"]["body"]["detail"][0]["type"] == "adapter_not_found"


# --- JavaScript @fal-ai/client, unmodified ------------------------------------------------------


@pytest.fixture(scope="module")
def js_client() -> Path:
    """Install the locked @fal-ai/client from the npm registry once."""
    if not (JS_DIR / "node_modules" / "@fal-ai" / "client").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=300)
    return JS_DIR / "fal_stream.mjs"


@pytest.mark.parametrize("mode", ["url", "middleware"])
def test_js_client_streams_previews_then_final_and_done_is_final(local_url: str, js_client: Path, mode: str) -> None:
    result = subprocess.run(
        ["node", str(js_client), local_url, json.dumps(SMALL), mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    events = [line["event"] for line in lines if "event" in line]
    assert [(event["type"], event.get("step")) for event in events] == [("preview", 0), ("preview", 5), ("final", None)]
    assert all(event["url"].startswith("data:image/jpeg;base64,") for event in events)
    assert lines[-1]["done"] == events[-1]  # stream.done() resolves to the final image
    assert lines[-1]["done_has_images"]


@pytest.mark.parametrize("mode", ["polling", "streaming"])
def test_js_client_subscribe(local_url: str, js_client: Path, mode: str) -> None:
    """fal.subscribe, unchanged, through the README's middleware for both of fal's hosts."""
    # Long enough to be seen running: a job done between two polls goes from IN_QUEUE to COMPLETED, as on fal.
    out = run_js(js_client.parent / "fal_queue.mjs", local_url, mode, {**SMALL, "num_inference_steps": 30})
    assert out["seed"] == 3 and out["url"].startswith(f"{local_url}/files/") and out["requestId"]
    assert out["statuses"][-1] == "COMPLETED" and "IN_PROGRESS" in out["statuses"]
    assert "step 30/30" in out["logs"] and out["logs"].count("Completed") == 1


def test_js_client_subscribes_with_a_lora(local_url: str, js_client: Path, tiny_adapters: Path) -> None:
    """`loras` from the unmodified @fal-ai/client, through the queue; the image differs from the one without."""
    small = {**SMALL, "width": 128, "height": 128}
    styled = run_js(
        js_client.parent / "fal_queue.mjs",
        local_url,
        "polling",
        {**small, "loras": [{"path": "tiny-style.safetensors", "scale": 0.8}]},
    )
    plain = run_js(js_client.parent / "fal_queue.mjs", local_url, "polling", small)
    assert styled["seed"] == plain["seed"] == 3 and styled["statuses"][-1] == "COMPLETED"
    images = [np.asarray(Image.open(io.BytesIO(httpx.get(out["url"]).content)), np.int16) for out in (styled, plain)]
    assert np.abs(images[0] - images[1]).mean() > 2


def test_js_client_queue_submit_status_result_cancel(local_url: str, js_client: Path) -> None:
    out = run_js(js_client.parent / "fal_queue.mjs", local_url, "queue")
    assert out["seed"] == 3 and out["status"] == "COMPLETED" and out["requestId"]
    assert out["cancelError"] == {"status": 400, "errorType": "cancelled"}


def run_js(script: Path, base_url: str, mode: str, body: dict = SMALL) -> dict:
    result = subprocess.run(
        ["node", str(script), base_url, json.dumps(body), mode], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def deadline_url(serve_harness: ServeHarness):
    yield serve_harness.deploy("deadline-js", "/deadline-js", args={"requests": {"timeout_s": 1}})
    serve_harness.remove("deadline-js")


def test_js_client_done_rejects_after_an_error_event(deadline_url: str, js_client: Path) -> None:
    slow = {**SMALL, "num_inference_steps": 50, "width": 512, "height": 512, "preview_interval": 1}
    result = subprocess.run(
        ["node", str(js_client), deadline_url, json.dumps(slow), "url"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert "done" not in lines[-1] and lines[-1]["rejected"]["status"] == 500  # not resolved as a result
    assert lines[-2]["event"]["error_type"] == "deadline_exceeded"  # the error event came through first


# --- CLI --------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [shutil.which("sdxl-stream") or "sdxl-stream", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_saves_previews_and_final_and_prints_seed(local_url: str, tmp_path: Path) -> None:
    result = run_cli(
        "a red fox", "--url", local_url, "--steps", "11", "--size", "320x256", "--seed", "9", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert "seed 9" in result.stdout and "inference" in result.stdout
    assert "11/11" in result.stderr  # tqdm's progress bar reached the last step
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "final.jpg",
        "preview_000.jpg",
        "preview_005.jpg",
        "preview_010.jpg",
    ]
    assert Image.open(tmp_path / "final.jpg").size == (320, 256)


def test_cli_png_output(local_url: str, tmp_path: Path) -> None:
    result = run_cli(
        "a fox", "--url", local_url, "--steps", "2", "--size", "256", "--format", "png", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "final.png").format == "PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "250x256"], "width: Input should be a multiple of 8"),
        (["--steps", "0"], "num_inference_steps: Input should be greater than or equal to 1"),
    ],
)
def test_cli_exits_non_zero_with_the_servers_message(local_url: str, tmp_path: Path, args: list, message: str) -> None:
    result = run_cli("a fox", "--url", local_url, "--out", str(tmp_path), *args)
    assert result.returncode == 1
    assert "422 validation_error" in result.stderr and message in result.stderr


def test_cli_unreachable_service(tmp_path: Path) -> None:
    result = run_cli("a fox", "--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "cannot reach" in result.stderr


# --- Request ids, CORS, OpenAPI -----------------------------------------------------------------


def test_request_id_is_returned_and_logged_by_both_deployments(local_url: str, client: httpx.Client) -> None:
    request_id = f"req-test-{time.time_ns()}"
    response = client.post(f"{local_url}/", json=SMALL, headers={"x-request-id": request_id})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    assert response.headers["x-fal-request-id"] == request_id
    generated = client.post(f"{local_url}/stream", json={**SMALL, "num_inference_steps": 1})
    assert generated.headers["x-fal-request-id"] == generated.headers["x-request-id"] != ""

    # Every session's logs: `session_latest` is whichever Ray instance started last (the TLS fixture's
    # `serve run` may start after this one), and the id is unique to this test anyway.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        logged = {
            deployment
            for deployment in ("SDXLIngress", "SDXLDeployment")
            for path in Path("/tmp/ray").glob(f"session_2*/logs/serve/replica_sdxl_{deployment}_*.log")
            if request_id in path.read_text(errors="replace")
        }
        if logged == {"SDXLIngress", "SDXLDeployment"}:
            break
        time.sleep(0.5)
    assert logged == {"SDXLIngress", "SDXLDeployment"}


@pytest.fixture(scope="module")
def cors_url(serve_harness: ServeHarness):
    yield serve_harness.deploy("cors", "/cors", args={"http": {"cors_allow_origins": ["http://app.example"]}})
    serve_harness.remove("cors")


def test_cors_preflight_allows_configured_origin_with_auth_header(cors_url: str, client: httpx.Client) -> None:
    preflight = client.options(
        f"{cors_url}/stream",
        headers={
            "origin": "http://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    response = client.post(f"{cors_url}/", json=SMALL, headers={"origin": "http://app.example"})
    assert response.headers["access-control-allow-origin"] == "http://app.example"
    assert "x-fal-request-id" in response.headers["access-control-expose-headers"]
    other = client.options(
        f"{cors_url}/stream", headers={"origin": "http://evil.example", "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(local_url: str, client: httpx.Client) -> None:
    response = client.post(f"{local_url}/", json=SMALL, headers={"origin": "http://app.example"})
    assert "access-control-allow-origin" not in response.headers


def test_openapi_documents_request_examples_and_event_schemas(local_url: str, client: httpx.Client) -> None:
    spec = client.get(f"{local_url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert schemas["GenerationRequest"]["examples"][0]["prompt"] == "a red fox"
    assert {"PreviewEvent", "FinalEvent", "ErrorBody"} <= set(schemas)
    stream_doc = json.dumps(spec["paths"]["/stream"]["post"]["responses"]["200"])
    assert "text/event-stream" in stream_doc and "PreviewEvent" in stream_doc and "FinalEvent" in stream_doc
    docs = client.get(f"{local_url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# --- Metrics ----------------------------------------------------------------------------------


def test_custom_metrics_are_exported(local_url: str, serve_harness: ServeHarness) -> None:
    burst = {**SMALL, "num_inference_steps": 20}

    def post(_: int) -> int:
        with httpx.Client(timeout=300) as client:
            return client.post(f"{local_url}/", json=burst).status_code

    # 1 running + 8 queued (configs/local.yaml): twice that many at once are rejected even when a loaded
    # machine spreads their arrival over several generations.
    with ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(post, range(24)))
    assert 503 in statuses and 200 in statuses
    with httpx.Client(timeout=120) as client:  # a job, for the job queue's metrics
        job = client.post(f"{local_url}/queue/local/sdxl", json={**SMALL, "num_inference_steps": 1}).json()
        result = client.get(job["response_url"])
        deadline = time.monotonic() + 60
        while result.status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            result = client.get(job["response_url"])
        assert result.status_code == 200, result.text

    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = {
        "ray_sdxl_time_to_first_preview_seconds_bucket",
        "ray_sdxl_denoising_steps_per_second_bucket",
        "ray_sdxl_preview_encode_seconds_bucket",
        "ray_sdxl_requests_total",
        "ray_sdxl_rejections_total",
        "ray_sdxl_jobs_total",
        "ray_sdxl_job_queue_depth",
        "ray_sdxl_job_wait_seconds_bucket",
    }
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_sdxl_")}
        if wanted <= found:
            break
        time.sleep(2)
    assert wanted <= found
    assert 'outcome="completed"' in text and 'reason="overloaded"' in text
