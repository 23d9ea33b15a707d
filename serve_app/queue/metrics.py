"""What the job queue reports: `QueueMetrics` does nothing (tests, benchmarks); `ServeQueueMetrics`
exports Serve metrics (Ray adds a `ray_` prefix and the `deployment`, `replica` and `application` tags).
Create the latter inside a replica."""

from __future__ import annotations


class QueueMetrics:
    def job_finished(self, outcome: str, error_type: str) -> None:
        """A job completed: `outcome` is completed, failed or cancelled."""

    def queue_depth(self, waiting: int) -> None:
        """Jobs waiting: in the store, and dispatched but not started."""

    def waited(self, seconds: float) -> None:
        """A job started this long after its submission."""

    def evicted(self, reason: str, count: int) -> None:
        """Finished jobs forgotten: `expired` (the result TTL) or a cap."""

    def webhook(self, outcome: str) -> None:
        """One webhook attempt: delivered, refused (a 4xx), retrying, given_up."""


class ServeQueueMetrics(QueueMetrics):
    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self._jobs = Counter(
            "sdxl_jobs_total",
            description="Queue jobs by outcome (completed, failed, cancelled) and error type.",
            tag_keys=("outcome", "error_type"),
        )
        self._depth = Gauge(
            "sdxl_job_queue_depth", description="Jobs waiting: in the store, and dispatched but not started."
        )
        self._wait = Histogram(
            "sdxl_job_wait_seconds",
            description="From a job's submission to the start of its generation.",
            boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600],
        )
        self._evictions = Counter(
            "sdxl_job_evictions_total",
            description="Finished jobs forgotten: expired (the result TTL), or evicted past a cap.",
            tag_keys=("reason",),
        )
        self._webhooks = Counter(
            "sdxl_webhook_attempts_total",
            description="Webhook attempts by outcome: delivered, refused, retrying, given_up.",
            tag_keys=("outcome",),
        )

    def job_finished(self, outcome: str, error_type: str) -> None:
        self._jobs.inc(tags={"outcome": outcome, "error_type": error_type})

    def queue_depth(self, waiting: int) -> None:
        self._depth.set(waiting)

    def waited(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def evicted(self, reason: str, count: int) -> None:
        self._evictions.inc(count, tags={"reason": reason})

    def webhook(self, outcome: str) -> None:
        self._webhooks.inc(tags={"outcome": outcome})
