"""Client-side tools for the service: the `sdxl-stream` CLI and a local TLS certificate for fal clients."""
