"""The ingress's and the job queue's custom Serve metrics. Ray exports them with a `ray_` prefix on each node's metrics
port, with Serve's `deployment`, `replica` and `application` tags added. Create inside a replica."""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram


class IngressMetrics:
    def __init__(self) -> None:
        self.rejections = Counter(
            "sdxl_rejections_total",
            description="Requests turned away before generating: overloaded (queue full) or queue_timeout.",
            tag_keys=("reason",),
        )


class JobQueueMetrics:
    def __init__(self) -> None:
        self.jobs = Counter(
            "sdxl_jobs_total",
            description="Queue jobs by outcome (completed, failed, cancelled) and error type.",
            tag_keys=("outcome", "error_type"),
        )
        self.queue_depth = Gauge(
            "sdxl_job_queue_depth", description="Jobs waiting: in the store, and dispatched but not started."
        )
        self.wait = Histogram(
            "sdxl_job_wait_seconds",
            description="From a job's submission to the start of its generation.",
            boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600],
        )
