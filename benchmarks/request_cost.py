"""What one small request costs the server, per process, next to a plain FastAPI app; and how much
clients polling `GET /health` (and the queue's status route, once it exists) slow a running generation.

    python -m benchmarks.request_cost                  # configs/local.yaml, tiny model on the CPU
    python -m benchmarks.request_cost --quick          # fewer requests, repeats and rounds
    python -m benchmarks.request_cost --direct-ingress # RAY_SERVE_ENABLE_DIRECT_INGRESS=1; adds rows sent
                                                       # straight to the ingress replica's own port
    python -m benchmarks.request_cost --env RAY_SERVE_LOG_TO_STDERR=0 \
        --logging-config '{"enable_access_log": false}' --out /tmp/variant.md   # try a setting

Server CPU per request: the CPU time (user + system, psutil) of every process this run's Ray started,
by class, while a keep-alive load generator sends the requests, minus each class's idle rate measured
just before over a window as long, divided by the count. Classes: proxy (`ray::ProxyActor`), ingress
(the `SDXLIngress` replica), job-queue (a replica whose deployment name has "Queue" or "Job"), model
(the `SDXLDeployment` replica: reported apart, never in the total) and others (raylet, GCS, controller,
agents, idle workers). The idle window is as long as the load window, up to 10 s. For the generation
rows the total leaves "others" out (shown in parentheses): the model replica's run makes their background
swing by more than the ingress's share. The load generator is this process, which is not counted. Each row
is measured `--repeats` times; the table gives medians. The plain app is `benchmarks/plain_health_app.py` under uvicorn.

Slowdown: one `POST /` generation (512x512, 20 steps, fixed seed) timed alone and with 5 and 20
clients each polling at 10/s, in rounds that run every client count once (order rotated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from tests.integration.harness import ServeHarness, free_port, load_config

CONFIG = "configs/local.yaml"
APP = "sdxl"
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
CLASSES = ("proxy", "ingress", "job-queue", "others")
SERVING = ("proxy", "ingress", "job-queue")  # what a generation row's total counts
SETTLE_S = 1.0  # before each idle window: the previous measurement's trailing work (logs, metrics) ends first
IDLE_MAX_S = 10.0  # the idle rate is a rate: a long row's load window is compared with at most this much idle
TAIL_S = 0.5  # after the last response: work the requests left behind (log flushes, metric pushes) is theirs
TINY_RUN = {"prompt": "a red fox", "num_inference_steps": 2, "width": 128, "height": 128, "seed": 1}
STREAM_RUN = {**TINY_RUN, "num_inference_steps": 50, "preview_interval": 1}
SLOWDOWN_RUN = {"prompt": "a red fox in the snow", "num_inference_steps": 20, "width": 512, "height": 512, "seed": 42}
POLL_INTERVAL_S = 0.1  # fal_client polls a queued request's status 10 times a second


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500, help="requests per small-request row")
    parser.add_argument("--generations", type=int, default=10, help="POST / and POST /stream calls per row")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row (medians reported)")
    parser.add_argument("--rounds", type=int, default=3, help="slowdown rounds")
    parser.add_argument("--pollers", default="0,5,20", help="client counts for the slowdown rounds")
    parser.add_argument("--concurrency", type=int, default=1, help="load generator connections")
    parser.add_argument("--row-budget-s", type=float, default=20.0, help="stop a row's requests after this")
    parser.add_argument("--small-only", action="store_true", help="skip the POST / and POST /stream rows")
    parser.add_argument("--quick", action="store_true", help="300 requests, 5 generations, 2 repeats, 2 rounds")
    parser.add_argument("--direct-ingress", action="store_true", help=f"run Ray with {DIRECT_INGRESS_ENV}=1")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for every Ray process")
    parser.add_argument(
        "--logging-config", type=json.loads, default=None, help="Serve LoggingConfig (JSON) for proxy and replicas"
    )
    parser.add_argument("--queue-path", default="/queue/local/sdxl", help="the queue API's submit route")
    parser.add_argument("--skip-slowdown", action="store_true")
    parser.add_argument(
        "--poll-via", choices=("status-port", "proxy"), default="status-port",
        help="where the slowdown rounds' clients poll: the status port (what the front proxy routes polls to) "
        "or Serve's proxy",
    )  # fmt: skip
    parser.add_argument("--torch-threads", type=int, help="the SDXL replica's torch threads (`torch_threads`)")
    parser.add_argument(
        "--pin-model-core", action="store_true",
        help="for the slowdown rounds, pin the model replica to one core and everything else to the others",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/request_cost.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.generations, args.repeats, args.rounds, args.row_budget_s = 300, 4, 2, 2, 10.0
    args.status_port = free_port()
    return args


def requested_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(item.split("=", 1) for item in args.env)
    if args.direct_ingress:
        env[DIRECT_INGRESS_ENV] = "1"
    return env


def reexec_with(env: dict[str, str]) -> None:
    """Serve reads its settings from the environment when its modules are imported, in every process:
    restart this one with them set, before Ray starts, so raylet and every worker inherit them."""
    if all(os.environ.get(name) == value for name, value in env.items()):
        return
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.request_cost", *sys.argv[1:]], {**os.environ, **env})


# -- processes and their CPU time -------------------------------------------------------------------


def process_class(process: psutil.Process) -> str:
    """Which class a Ray process belongs to, from the title Ray gives each worker (`ray::<actor>`)."""
    title = " ".join(process.cmdline())
    if title.startswith("ray::ProxyActor"):
        return "proxy"
    if title.startswith("ray::ServeReplica:"):
        deployment = title.split()[0].rsplit(":", 1)[-1]
        if deployment == "SDXLIngress":
            return "ingress"
        if "Queue" in deployment or "Job" in deployment:
            return "job-queue"
        if deployment == "SDXLDeployment":
            return "model"
    return "others"


def find_replica(deployment: str) -> psutil.Process:
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] == [f"ray::ServeReplica:{APP}:{deployment}"]:
                return process
        except psutil.Error:
            continue
    raise LookupError(f"no {deployment} replica process")


def pin_model_to_one_core(model: psutil.Process) -> str:
    """The model replica on core 0, everything else this run started (Ray, the plain app, this process
    and its pollers) on the others: a machine with cores to spare for the HTTP stack, made exact, so the
    pollers' own load cannot land on the generation's core. Every thread: affinity is per thread."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--pin-model-core needs at least 2 cores")
    rest = set(cores[1:])
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        _pin_threads(process.pid, {cores[0]} if process.pid == model.pid else rest)
    return f"model replica on core {cores[0]}, everything else on {len(rest)} other core(s)"


def _pin_threads(pid: int, cores: set[int]) -> None:
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            os.sched_setaffinity(int(task.name), cores)
        except (ProcessLookupError, PermissionError):
            continue


class CpuMeter:
    """CPU seconds by class of every process this run started, except `excluded` (the plain app)."""

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self._classes: dict[int, str] = {}

    def snapshot(self) -> dict[int, tuple[str, float]]:
        taken = {}
        for process in psutil.Process().children(recursive=True):
            if process.pid in self.excluded:
                continue
            try:
                if process.pid not in self._classes:
                    self._classes[process.pid] = process_class(process)
                times = process.cpu_times()
                taken[process.pid] = (self._classes[process.pid], times.user + times.system)
            except psutil.Error:
                continue
        return taken

    @staticmethod
    def spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
        """CPU seconds per class between two snapshots; a process born in between counts from zero."""
        by_class: dict[str, float] = {}
        for pid, (name, seconds) in after.items():
            by_class[name] = by_class.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
        return by_class


def process_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system + times.children_user + times.children_system


# -- what one row sends -----------------------------------------------------------------------------


@dataclass
class Workload:
    """A row: `send(client)` makes one request and returns how many units it counts for (requests or
    events); `count` calls per measurement, `warmup` calls before."""

    name: str
    send: Callable[[httpx.Client], int]
    count: int
    warmup: int = 20
    plain: bool = False  # served by the plain app: its own process is the whole cost
    counted: tuple[str, ...] = CLASSES  # the classes its total adds up


@dataclass
class Cost:
    """Median ms of server CPU per unit, by class, over the repeats."""

    by_class: dict[str, float]
    units: int
    totals: list[float] = field(default_factory=list)  # total ms per unit of each repeat


def get(url: str, expect: int = 200) -> Callable[[httpx.Client], int]:
    def send(client: httpx.Client) -> int:
        response = client.get(url)
        if response.status_code != expect:
            raise RuntimeError(f"GET {url}: {response.status_code} {response.text[:200]}")
        return 1

    return send


def post_run(url: str) -> Callable[[httpx.Client], int]:
    def send(client: httpx.Client) -> int:
        response = client.post(url, json=TINY_RUN)
        if response.status_code != 200:
            raise RuntimeError(f"POST {url}: {response.status_code} {response.text[:200]}")
        return 1

    return send


def stream_events(url: str) -> Callable[[httpx.Client], int]:
    """One `POST /stream` read to the end; counts its SSE data events."""

    def send(client: httpx.Client) -> int:
        events, last = 0, ""
        with client.stream("POST", url, json=STREAM_RUN) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events, last = events + 1, line
        if '"type":"final"' not in last.replace(" ", ""):
            raise RuntimeError(f"{url} ended without a final event: {last[:200]}")
        return events

    return send


def measure(meter: CpuMeter, workload: Workload, clients: list[httpx.Client], args, plain_pid: int) -> Cost:
    """Server CPU per unit of `workload`: load window minus the idle rate over a window as long."""
    for _ in range(workload.warmup):
        workload.send(clients[0])
    samples: list[dict[str, float]] = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        workload.send(clients[0])
        estimate_s = min(max((time.perf_counter() - started) * workload.count / len(clients), 2.0), args.row_budget_s)
        time.sleep(SETTLE_S)
        idle_before, plain_idle_before, idle_started = meter.snapshot(), process_seconds(plain_pid), time.perf_counter()
        time.sleep(min(estimate_s, IDLE_MAX_S))
        idle, plain_idle = meter.snapshot(), process_seconds(plain_pid)
        idle_s = time.perf_counter() - idle_started
        units, load_s = send_all(workload, clients, args.row_budget_s)
        time.sleep(TAIL_S)
        loaded, plain_loaded = meter.snapshot(), process_seconds(plain_pid)
        window_s = load_s + TAIL_S
        idle_rate = CpuMeter.spent(idle_before, idle)
        load = CpuMeter.spent(idle, loaded)
        per_unit = {
            name: (load.get(name, 0.0) - idle_rate.get(name, 0.0) / idle_s * window_s) * 1000 / units
            for name in (*CLASSES, "model")
        }
        per_unit["plain"] = (
            ((plain_loaded - plain_idle) - (plain_idle - plain_idle_before) / idle_s * window_s) * 1000 / units
        )
        samples.append(per_unit)
    cost = Cost({name: statistics.median(s[name] for s in samples) for name in samples[0]}, units)
    cost.totals = [total_ms(s, workload) for s in samples]
    return cost


def total_ms(per_unit: dict[str, float], workload: Workload) -> float:
    return per_unit["plain"] if workload.plain else sum(per_unit[name] for name in workload.counted)


def send_all(workload: Workload, clients: list[httpx.Client], budget_s: float) -> tuple[int, float]:
    """`workload.count` calls over the clients' connections, at most `budget_s`; (units, seconds)."""
    started = time.perf_counter()
    deadline = started + budget_s
    share = -(-workload.count // len(clients))

    def run(client: httpx.Client) -> int:
        units = 0
        for _ in range(share):
            if time.perf_counter() > deadline:
                break
            units += workload.send(client)
        return units

    with ThreadPoolExecutor(len(clients)) as pool:
        units = sum(pool.map(run, clients))
    return units, time.perf_counter() - started


# -- the queue API, once it exists --------------------------------------------------------------------


def queue_status_url(client: httpx.Client, base: str, queue_path: str) -> str | None:
    """Submit a tiny job to the queue API (fal's shape: `POST <app>` answers with `status_url`) and
    return its status URL once the job has finished, or None while the service has no queue API."""
    response = client.post(base + queue_path, json=TINY_RUN)
    if response.status_code in (404, 405):
        return None
    response.raise_for_status()
    job = response.json()
    status_url = job.get("status_url") or f"{queue_path}/requests/{job['request_id']}/status"
    parts = urlsplit(status_url)  # the returned URL may name a public host: only ever ask this one
    status_url = base + parts.path + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = client.get(status_url)
        if status.status_code == 404:
            return None
        if status.status_code < 300 and status.json().get("status") == "COMPLETED":
            return status_url
        time.sleep(0.2)
    raise TimeoutError(f"the queued job did not complete: {status.status_code} {status.text[:200]}")


# -- a generation while clients poll ------------------------------------------------------------------


class Pollers:
    """`count` clients, each on its own keep-alive connection, each GETting `urls` every 0.1 s."""

    def __init__(self, count: int, urls: list[str]) -> None:
        self.count, self.urls = count, urls
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Pollers:
        if self.count:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.count:
            self._thread.join()

    async def _run(self) -> None:
        await asyncio.gather(*(self._client(index) for index in range(self.count)))

    async def _client(self, index: int) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.sleep(POLL_INTERVAL_S * index / self.count)  # spread, as independent clients are
            next_at = time.perf_counter()
            while not self._stop.is_set():
                for url in self.urls:
                    started = time.perf_counter()
                    response = await client.get(url)
                    self.latencies.append(time.perf_counter() - started)
                    self.failures += response.status_code >= 500
                next_at += POLL_INTERVAL_S
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))


@dataclass
class SlowdownSample:
    seconds: float
    polls_per_s: float
    poll_ms_p50: float | None
    poll_ms_p99: float | None


def timed_generation(client: httpx.Client, url: str, pollers: int, poll_urls: list[str]) -> SlowdownSample:
    with Pollers(pollers, poll_urls) as polling:
        time.sleep(1.0 if pollers else 0.0)  # polling at its steady rate before the clock starts
        polls_before, started = len(polling.latencies), time.perf_counter()
        response = client.post(url, json=SLOWDOWN_RUN)
        seconds = time.perf_counter() - started
        polls = len(polling.latencies) - polls_before
    if response.status_code != 200:
        raise RuntimeError(f"POST {url}: {response.status_code} {response.text[:200]}")
    if polling.failures:
        raise RuntimeError(f"{polling.failures} polls failed")
    latencies = sorted(polling.latencies)
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else None
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None
    return SlowdownSample(seconds, polls / seconds, p50, p99)


def slowdown(base: str, poll_urls: list[str], counts: list[int], rounds: int) -> dict[int, list[SlowdownSample]]:
    samples: dict[int, list[SlowdownSample]] = {count: [] for count in counts}
    with httpx.Client(timeout=600) as client:
        client.post(base + "/", json=SLOWDOWN_RUN).raise_for_status()  # warm-up
        for index in range(rounds):
            order = counts[index % len(counts) :] + counts[: index % len(counts)]
            for count in order:
                time.sleep(SETTLE_S)
                samples[count].append(timed_generation(client, base + "/", count, poll_urls))
    return samples


# -- the run ----------------------------------------------------------------------------------------


def start_plain_app() -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="plain_health_app-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.plain_health_app", "--port", str(port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            httpx.get(f"{url}/health", timeout=1).raise_for_status()
            return process, url
        except httpx.HTTPError:
            time.sleep(0.25)
    raise TimeoutError(f"the plain app did not start; its log: {log.name}")


def direct_ingress_url(ingress: psutil.Process) -> str | None:
    """The ingress replica's own HTTP port, which Serve opens only with direct ingress on."""
    from ray.serve._private import constants

    if not constants.RAY_SERVE_ENABLE_DIRECT_INGRESS:
        return None
    low, high = constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
    for connection in ingress.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and low <= connection.laddr.port <= high:
            return f"http://127.0.0.1:{connection.laddr.port}"
    return None


def deploy(args: argparse.Namespace) -> tuple[ServeHarness, str]:
    from ray.serve._private import api as serve_private_api

    port = free_port()
    overrides = {}
    if args.logging_config is not None:
        # The proxy takes Serve's global logging config (a Serve YAML's top-level `logging_config` under
        # `serve deploy` and KubeRay); replicas take their deployment's.
        serve_private_api.serve_start(
            http_options={"host": "127.0.0.1", "port": port}, global_logging_config=args.logging_config
        )
        overrides = {name: {"logging_config": args.logging_config} for name in ("SDXLIngress", "SDXLDeployment")}
    harness = ServeHarness(port)
    app_args: dict = {"status_server": {"port": args.status_port}}
    if args.torch_threads is not None:
        app_args["model"] = {"torch_threads": args.torch_threads}
    return harness, harness.deploy(APP, "/", CONFIG, args=app_args, deployments=overrides, timeout_s=300)


def main() -> None:
    args = parse_args()
    env = requested_env(args)
    reexec_with(env)
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # its own instance, never a cluster
    harness, base = deploy(args)
    plain, plain_url = start_plain_app()
    meter = CpuMeter(excluded={plain.pid})
    ingress, model = find_replica("SDXLIngress"), find_replica("SDXLDeployment")
    direct = direct_ingress_url(ingress)
    status_port = f"http://127.0.0.1:{args.status_port}"
    clients = [httpx.Client(timeout=600) for _ in range(args.concurrency)]

    status_url = queue_status_url(clients[0], base, args.queue_path)
    status_path = urlsplit(status_url).path if status_url else None
    small, generations = args.requests, args.generations
    workloads = [
        Workload("plain FastAPI `GET /health` (uvicorn, no Ray)", get(f"{plain_url}/health"), small, plain=True)
    ]
    workloads += [
        Workload("`GET /health` via Serve's proxy", get(f"{base}/health"), small),
        Workload("Ray proxy only: `GET /-/healthz`", get(f"{base}/-/healthz"), small),
    ]
    if status_url:
        workloads.append(Workload("queue status poll via proxy", get(status_url), small))
    workloads.append(Workload("`GET /health` via the status port", get(f"{status_port}/health"), small))
    if status_path:
        workloads.append(Workload("queue status poll via the status port", get(status_port + status_path), small))
    if direct:
        workloads.append(Workload("`GET /health`, direct ingress (no proxy)", get(f"{direct}/health"), small))
        if status_url:
            workloads.append(Workload("queue status poll, direct ingress", get(direct + status_path), small))
    if not args.small_only:
        workloads += [
            Workload("`POST /` tiny generation (non-model part)", post_run(f"{base}/"), generations, warmup=1,
                     counted=SERVING),
            Workload("per SSE event: `POST /stream`, preview every step", stream_events(f"{base}/stream"),
                     generations, warmup=1, counted=SERVING),
        ]  # fmt: skip
    costs = {}
    for workload in workloads:
        costs[workload.name] = measure(meter, workload, clients, args, plain.pid)
        print(f"{workload.name}: {statistics.median(costs[workload.name].totals):.2f} ms", file=sys.stderr)
    for client in clients:
        client.close()

    counts = [int(count) for count in args.pollers.split(",")]
    poll_base = status_port if args.poll_via == "status-port" else base
    poll_urls = [f"{poll_base}/health"] + ([poll_base + status_path] if status_path else [])
    pinning = pin_model_to_one_core(model) if args.pin_model_core and not args.skip_slowdown else None
    slow = {} if args.skip_slowdown else slowdown(base, poll_urls, counts, args.rounds)

    facts = {
        "cores": os.cpu_count(),
        "sdxl_num_cpus": replica_num_cpus("SDXLDeployment"),
        "ingress_num_cpus": replica_num_cpus("SDXLIngress"),
        "omp_threads": model.environ().get("OMP_NUM_THREADS", f"unset, so torch's default: {psutil.cpu_count(False)}"),
        "torch_threads": args.torch_threads,
        "pinning": pinning,
        "env": env,
        "direct": direct,
        "ray": ray.__version__,
    }
    report = render(args, workloads, costs, status_url, slow, counts, facts)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    plain.terminate()
    ray.shutdown()


def replica_num_cpus(deployment: str) -> float:
    app = load_config(CONFIG)["applications"][0]
    options = next(d for d in app["deployments"] if d["name"] == deployment).get("ray_actor_options", {})
    return options.get("num_cpus", 1)


def ratio(total_ms: float, plain_ms: float) -> str:
    """`total / plain`, or why there is none: on a busy machine the plain row can vanish into the idle
    background that is subtracted from every row, and a ratio to ~0 would say nothing."""
    if plain_ms < 0.01:
        return "n/a (plain row within idle noise)"
    return f"{total_ms / plain_ms:.1f}x"


def render(args, workloads, costs, status_url, slow, counts, facts) -> str:
    plain_ms = costs[workloads[0].name].by_class["plain"]
    settings = ", ".join(f"`{name}={value}`" for name, value in facts["env"].items()) or "none"
    lines = [
        f"# Server CPU per request: {CONFIG}, tiny model, CPU, {facts['cores']} cores",
        "",
        f"`python -m benchmarks.request_cost {' '.join(sys.argv[1:])}`; Python {platform.python_version()}, "
        f"Ray {facts['ray']}. Environment for Ray: {settings}; logging config: "
        f"{json.dumps(args.logging_config) if args.logging_config is not None else 'default'}. "
        f"{args.requests} small requests or {args.generations} generations per row over {args.concurrency} "
        f"keep-alive connection(s); each row measured {args.repeats} times, medians. ms = server CPU ms "
        "per request (per event for the SSE row), idle background subtracted; the load generator (this "
        "process) is not counted.",
        "",
        "| path | proxy ms | ingress ms | job-queue ms | others ms | total ms | vs plain FastAPI |",
        "|---|---|---|---|---|---|---|",
    ]
    for workload in workloads:
        cost = costs[workload.name]
        total = statistics.median(cost.totals)
        cells = ["", "", "", ""] if workload.plain else [f"{cost.by_class[name]:.2f}" for name in CLASSES]
        if "others" not in workload.counted:
            cells[CLASSES.index("others")] = f"({cells[CLASSES.index('others')]})"
        lines.append(f"| {workload.name} | {' | '.join(cells)} | {total:.2f} | {ratio(total, plain_ms)} |")
    if not status_url:
        lines.append(
            f"| queue status poll (`GET {args.queue_path}/requests/{{id}}/status`) | n/a (no queue API) |||||| "
        )
    if not facts["direct"]:
        lines.append(f"| direct ingress rows | n/a (run with `--direct-ingress` for `{DIRECT_INGRESS_ENV}=1`) |||||| ")
    lines += ["", "Spread and the model replica's share (not in the totals):", ""]
    for workload in workloads:
        cost = costs[workload.name]
        spread = ", ".join(f"{total:.2f}" for total in cost.totals)
        model = "" if workload.plain else f"; model replica {cost.by_class['model']:.2f} ms"
        lines.append(f"- {workload.name}: total per repeat {spread}{model}")
    lines += [
        "",
        f"The SSE row divides one `POST /stream` ({STREAM_RUN['num_inference_steps']} steps, "
        f"{STREAM_RUN['width']}px, a preview every step) by its data events, so each event carries 1/"
        f"{STREAM_RUN['num_inference_steps'] + 1} of the request's fixed cost. Tiny runs are "
        f"{TINY_RUN['num_inference_steps']} steps at {TINY_RUN['width']}px.",
    ]
    if slow:
        base_seconds = statistics.median(s.seconds for s in slow[counts[0]])
        polled = "`GET /health`" + (" and the queue status route" if status_url else "")
        lines += [
            "",
            f"## A generation while clients poll ({polled}, each client every {POLL_INTERVAL_S:g} s)",
            "",
            f"`POST /` {SLOWDOWN_RUN['width']}x{SLOWDOWN_RUN['height']}, {SLOWDOWN_RUN['num_inference_steps']} "
            f"steps, seed {SLOWDOWN_RUN['seed']}; {args.rounds} rounds, each running every client count once "
            f"(order rotated). Machine: {facts['cores']} cores; SDXL replica `num_cpus: "
            f"{facts['sdxl_num_cpus']}`, torch threads: "
            + (
                f"`torch_threads: {facts['torch_threads']}`"
                if facts["torch_threads"]
                else f"`OMP_NUM_THREADS` {facts['omp_threads']}"
            )
            + f"; ingress `num_cpus: {facts['ingress_num_cpus']}`. Clients poll "
            + ("the status port" if args.poll_via == "status-port" else "through Serve's proxy")
            + "; they run in the benchmark process on the same machine"
            + (f". CPU affinity for these rounds: {facts['pinning']}." if facts["pinning"] else "."),
            "",
            "| polling clients | generation s (median) | vs none, median within rounds | polls/s | poll ms p50 | "
            "poll ms p99 |",
            "|---|---|---|---|---|---|",
        ]
        for count in counts:
            samples = slow[count]
            within = statistics.median(s.seconds / b.seconds for s, b in zip(samples, slow[counts[0]], strict=True))
            p50 = _median_or_none([s.poll_ms_p50 for s in samples])
            p99 = _median_or_none([s.poll_ms_p99 for s in samples])
            lines.append(
                f"| {count} | {statistics.median(s.seconds for s in samples):.3f} | {within:.3f} | "
                f"{statistics.median(s.polls_per_s for s in samples):.0f} | {_fmt(p50)} | {_fmt(p99)} |"
            )
        lines.append("")
        lines.append(f"Generation alone: {base_seconds:.3f} s (median).")
    return "\n".join(lines) + "\n"


def _median_or_none(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
