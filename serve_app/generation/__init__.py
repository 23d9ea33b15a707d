"""The one seam to the model: a `GenerationClient` turns a `ResolvedRequest` into a `GenerationCall`,
whose typed events end with the final one and whose failures are catalog errors.

`ServeGenerationClient` (over the SDXL deployment's handle) is the only code that calls that handle;
`deployments.in_process.InProcessGenerationClient` runs an `SDXLEngine` in the caller's process, for
tests and benchmarks. The ingress's relay and the job queue take either.
"""

from serve_app.generation.client import GenerationCall, GenerationClient

__all__ = ["GenerationCall", "GenerationClient"]
