"""The queue under faults, on the real stack: a real `redis-server` with its append-only file, the Serve
app, webhooks to a real receiver. For each fault, jobs are submitted with webhooks and polled while the
fault lands; then every accepted job must have completed exactly once with one result (its image the
one its seed gives), its webhook must have arrived at least once (the same body each time), nothing
may be left queued or running, and no client may have seen a 500.

Each test adds a row to the fault table (`fault_table.md` in the pytest temp dir, printed at the end;
docs/queue.md carries the table from a run).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psutil
import pytest
import redis

from tests.integration.conftest import FAULT_REDIS_URL_ENV, TEST_API_KEY, TEST_API_KEYS_ENV
from tests.integration.harness import ServeHarness, free_port
from tests.redis_server import RedisProcess
from tests.s3_server import object_names

APP = "faults"
APP_ID = "local/sdxl"
KEY = {"authorization": f"Key {TEST_API_KEY}"}
JOBS = 6
BODY = {"prompt": "a fox in a storm", "width": 256, "height": 256, "num_inference_steps": 30}
LEASE_S = 2.0
BUCKET = "fault-suite-outputs"
QUEUE = {
    "store": "redis",
    "redis_url_env": FAULT_REDIS_URL_ENV,
    "lease_s": LEASE_S,
    "max_attempts": 3,
    "store_wait_s": 1.0,
    "webhook_allowed_hosts": ["127.0.0.1"],
    "webhook_retry_base_s": 0.5,
    "outputs_url": f"s3://{BUCKET}/faults",  # result images: the S3 server the session started
}
TABLE: list[dict] = []


class Receiver(ThreadingHTTPServer):
    """Webhook deliveries as sent: (request id, raw body)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append((json.loads(body)["request_id"], body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    url = os.environ[FAULT_REDIS_URL_ENV]
    server = RedisProcess(int(url.rsplit(":", 1)[1].split("/")[0]), tmp_path_factory.mktemp("fault-redis"))
    server.start()
    yield server
    server.stop()


def deploy(serve_harness: ServeHarness, job_queues: int = 1, version: int = 0) -> str:
    return serve_harness.deploy(
        APP,
        f"/{APP}",
        args={
            "http": {"api_keys_env": TEST_API_KEYS_ENV},
            "queue": QUEUE,
            "requests": {"timeout_s": 300 + version},  # a changed arg: a new version of every replica
        },
        deployments={"JobQueue": {"num_replicas": job_queues, "graceful_shutdown_timeout_s": 20}},
    )


@pytest.fixture(scope="module")
def url(serve_harness: ServeHarness, redis_server: RedisProcess) -> Iterator[str]:
    httpx.put(f"{os.environ['AWS_ENDPOINT_URL']}/{BUCKET}").raise_for_status()
    yield deploy(serve_harness)
    serve_harness.remove(APP)


@pytest.fixture(scope="module", autouse=True)
def fault_table(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    lines = [
        "| fault | jobs submitted | completed | run twice | lost | 500s seen |",
        "|---|---|---|---|---|---|",
        *(
            f"| {row['fault']} | {row['submitted']} | {row['completed']} | {row['run_twice']} | {row['lost']} | "
            f"{row['500s']} |"
            for row in TABLE
        ),
    ]
    path = tmp_path_factory.getbasetemp() / "fault_table.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n(written to {path})")


@dataclass
class Clients:
    """What the clients did and saw: jobs accepted, every HTTP status met."""

    url: str
    accepted: list[str] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def submit(self, http: httpx.Client, index: int, webhook: str) -> None:
        try:
            response = http.post(
                f"{self.url}/queue/{APP_ID}", params={"fal_webhook": webhook}, json={**BODY, "seed": 1000 + index}
            )
        except httpx.TransportError:
            self.statuses["no answer"] += 1
            return
        self.statuses[response.status_code] += 1
        if response.status_code == 200:
            self.accepted.append(response.json()["request_id"])
        else:
            assert response.status_code == 503 and response.headers["retry-after"], response.text

    def poll(self) -> None:
        """Status polls, as fal_client makes them, while the fault lands."""
        with httpx.Client(headers=KEY, timeout=30) as http:
            while not self.stop.is_set():
                for request_id in list(self.accepted):
                    try:
                        response = http.get(f"{self.url}/queue/{APP_ID}/requests/{request_id}/status")
                    except httpx.TransportError:
                        self.statuses["no answer"] += 1
                        continue
                    self.statuses[response.status_code] += 1
                time.sleep(0.2)


def status_of(http: httpx.Client, url: str, request_id: str) -> dict:
    return http.get(f"{url}/queue/{APP_ID}/requests/{request_id}/status", params={"logs": 1}).json()


def run_with_fault(
    name: str,
    url: str,
    receiver: Receiver,
    fault: Callable[[Clients], None],
    lost_allowed: bool = False,
    timeout_s: float = 240,
) -> dict:
    """Submit `JOBS` jobs, land `fault` once the first runs, wait for all to complete, check, add a row."""
    clients = Clients(url)
    webhook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    received_before = len(receiver.received)
    poller = threading.Thread(target=clients.poll, daemon=True)
    with httpx.Client(headers=KEY, timeout=60) as http:
        for index in range(JOBS):
            clients.submit(http, index, webhook)
        poller.start()
        deadline = time.monotonic() + 60
        while not any(status_of(http, url, i)["status"] == "IN_PROGRESS" for i in clients.accepted[:2]):
            assert time.monotonic() < deadline, "no job started"
            time.sleep(0.1)
        fault(clients)
        deadline = time.monotonic() + timeout_s
        while not all(status_of(http, url, i).get("status") == "COMPLETED" for i in clients.accepted):
            assert time.monotonic() < deadline, f"{name}: jobs left unfinished"
            time.sleep(0.5)
        clients.stop.set()
        poller.join()

        results = {i: http.get(f"{url}/queue/{APP_ID}/requests/{i}") for i in clients.accepted}
        for response in results.values():
            clients.statuses[response.status_code] += 1
        lost = [i for i, r in results.items() if r.status_code == 410 and r.json()["error_type"] == "job_lost"]
        done = {i: r.json() for i, r in results.items() if r.status_code == 200}
        assert len(done) + len(lost) == len(clients.accepted), {i: r.text[:200] for i, r in results.items()}
        if not lost_allowed:
            assert lost == []
        logs = {i: status_of(http, url, i)["logs"] for i in clients.accepted}
        for request_id, result in done.items():
            assert [entry["message"] for entry in logs[request_id]].count("Completed") <= 1
            assert result["seed"] >= 1000 and len(result["images"]) == 1
        check_images_match_their_seeds(http, url, done)

    deadline = time.monotonic() + 60  # webhooks: at least once each, the same body every time
    while {i for i, _ in receiver.received[received_before:]} < set(clients.accepted):
        assert time.monotonic() < deadline, f"{name}: webhooks missing"
        time.sleep(0.2)
    bodies: dict[str, set[bytes]] = {}
    for request_id, body in receiver.received[received_before:]:
        bodies.setdefault(request_id, set()).add(body)
    assert all(len(sent) == 1 for sent in bodies.values()), "a webhook was sent twice with different bodies"

    row = {
        "fault": name,
        "submitted": len(clients.accepted),
        "completed": len(done),
        "run_twice": sum([entry["message"] for entry in log].count("Started") > 1 for log in logs.values()),
        "lost": len(lost),
        "500s": clients.statuses[500],
    }
    TABLE.append(row)
    assert clients.statuses[500] == 0, clients.statuses
    return row


def check_images_match_their_seeds(http: httpx.Client, url: str, done: dict[str, dict]) -> None:
    """The file a result names is the image its seed gives: two jobs, each against a fresh `POST /` with
    the same body (at most one run of a job writes its files and result)."""
    for result in list(done.values())[:2]:
        served = http.get(result["images"][0]["url"])
        assert served.status_code == 200
        fresh = http.post(f"{url}/", json={**BODY, "seed": result["seed"]}).json()
        assert base64.b64decode(fresh["images"][0]["url"].split(",", 1)[1]) == served.content


def test_redis_killed_and_restarted_while_jobs_queue_and_run(url: str, receiver: Receiver, redis_server) -> None:
    def fault(clients: Clients) -> None:
        redis_server.kill()
        time.sleep(1.0)
        with httpx.Client(headers=KEY, timeout=30) as http:  # a submit during the outage: 503, never a job
            clients.submit(http, 99, f"http://127.0.0.1:{free_port()}/")
        time.sleep(2.0)
        redis_server.start()  # the append-only file brings back everything it acknowledged

    run_with_fault("Redis killed (SIGKILL), restarted after 3 s", url, receiver, fault)


def test_redis_paused_longer_than_a_lease(url: str, receiver: Receiver, redis_server) -> None:
    def fault(clients: Clients) -> None:
        redis_server.pause()
        time.sleep(2 * LEASE_S + 1)
        redis_server.resume()

    row = run_with_fault(f"Redis paused (SIGSTOP) for {2 * LEASE_S + 1:g} s, over two leases", url, receiver, fault)
    assert row["run_twice"] == 0  # no lease was taken from a live owner cut off by the pause


def replica_pid(deployment: str) -> int:
    """By its process title (Ray's `ray::ServeReplica:<app>:<deployment>`): a model replica busy with a
    generation answers no call meanwhile."""
    title = f"ServeReplica:{APP}:{deployment}"
    (pid,) = [p.pid for p in psutil.process_iter(["cmdline"]) if any(title in part for part in p.info["cmdline"] or [])]
    return pid


def test_a_model_replica_killed_mid_run(url: str, receiver: Receiver) -> None:
    def fault(clients: Clients) -> None:
        os.kill(replica_pid("SDXLDeployment"), signal.SIGKILL)

    row = run_with_fault("the SDXL replica killed (SIGKILL) mid-run", url, receiver, fault)
    assert row["run_twice"] >= 1  # the job it was running went to the next replica


def test_the_job_queue_killed(url: str, receiver: Receiver) -> None:
    def fault(clients: Clients) -> None:
        os.kill(replica_pid("JobQueue"), signal.SIGKILL)

    run_with_fault("the job-queue replica killed (SIGKILL)", url, receiver, fault)


def test_redis_flushed(url: str, receiver: Receiver, redis_server) -> None:
    """Everything gone at once (FLUSHDB; a Redis restarted without its data is the same): no client
    polls for ever. A job that was running puts itself back and finishes with its result; the queued
    ones complete as job_lost."""

    def fault(clients: Clients) -> None:
        redis.Redis.from_url(redis_server.url).flushdb()

    row = run_with_fault("Redis flushed (FLUSHDB)", url, receiver, fault, lost_allowed=True)
    assert row["completed"] >= 1 and row["lost"] >= 1


def test_two_job_queue_replicas_and_a_redeploy(url: str, serve_harness: ServeHarness, receiver: Receiver) -> None:
    url = deploy(serve_harness, job_queues=2, version=1)

    def fault(clients: Clients) -> None:
        threading.Thread(target=deploy, args=(serve_harness, 2, 2), daemon=True).start()

    run_with_fault("two job-queue replicas, and a redeploy of every replica mid-run", url, receiver, fault)
    deploy(serve_harness, version=0)  # as the module's other tests found it


def redis_values(client: redis.Redis) -> Iterator[bytes]:
    """Every value the store holds, whatever its key's type."""
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            yield client.get(key)
        elif kind == b"hash":
            yield from client.hgetall(key).values()
        elif kind == b"list":
            yield from client.lrange(key, 0, -1)
        elif kind == b"set":
            yield from client.smembers(key)
        elif kind == b"zset":
            yield from client.zrange(key, 0, -1)


def test_images_live_in_the_object_store_for_as_long_as_asked_and_never_in_redis(url: str, redis_server) -> None:
    """Results name files in the S3 bucket (a `sync_mode` result inlines them, read back from there);
    Redis holds no image bytes; a file asked to live 8 s answers 404 after that."""
    lifecycle = {"x-fal-object-lifecycle-preference": json.dumps({"expiration_duration_seconds": 8})}
    with httpx.Client(headers=KEY, timeout=60) as http:
        plain = http.post(f"{url}/queue/{APP_ID}", json={**BODY, "num_inference_steps": 2}).json()["request_id"]
        inline = http.post(f"{url}/queue/{APP_ID}", json={**BODY, "num_inference_steps": 2, "sync_mode": True})
        short = http.post(f"{url}/queue/{APP_ID}", json={**BODY, "num_inference_steps": 2}, headers=lifecycle)
        jobs = [plain, inline.json()["request_id"], short.json()["request_id"]]
        deadline = time.monotonic() + 120
        while not all(status_of(http, url, i)["status"] == "COMPLETED" for i in jobs):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        results = [http.get(f"{url}/queue/{APP_ID}/requests/{i}").json() for i in jobs]
        short_url = results[2]["images"][0]["url"]
        fetched = http.get(short_url)
        stored = object_names(os.environ["AWS_ENDPOINT_URL"], BUCKET)
        values = list(redis_values(redis.Redis.from_url(os.environ[FAULT_REDIS_URL_ENV])))
        time.sleep(9)
        expired = http.get(short_url)
        kept = http.get(results[0]["images"][0]["url"])

    assert fetched.status_code == 200 and fetched.content[:2] == b"\xff\xd8"
    assert expired.status_code == 404 and expired.json()["error_type"] == "not_found"
    assert kept.status_code == 200  # the default: days
    assert results[1]["images"][0]["url"].startswith("data:image/jpeg;base64,")
    files = [result["images"][0]["url"].split("/files/", 1)[-1] for result in (results[0], results[2])]
    for file in files:  # `/files/<expires>.<secret>/0.jpeg` is `<prefix>/<expires>/<secret>/0.jpeg` in the bucket
        token, name = file.split("/")
        assert f"faults/{token.replace('.', '/', 1)}/{name}" in stored
    assert len(stored) >= 3  # the inline result's image too
    assert values and not any(b"\xff\xd8\xff" in value or b"data:image" in value for value in values)
