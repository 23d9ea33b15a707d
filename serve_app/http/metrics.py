"""The ingress's custom Serve metrics. Ray exports them with a `ray_` prefix on each node's metrics port,
with Serve's `deployment`, `replica` and `application` tags added. Create inside a replica."""

from __future__ import annotations

from ray.serve.metrics import Counter


class IngressMetrics:
    def __init__(self) -> None:
        self.rejections = Counter(
            "sdxl_rejections_total",
            description="Requests turned away before generating: overloaded (queue full) or queue_timeout.",
            tag_keys=("reason",),
        )
