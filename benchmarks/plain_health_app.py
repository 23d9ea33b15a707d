"""The floor for a small request: a one-route FastAPI app under plain uvicorn, no Ray.

`benchmarks.request_cost` runs it in a subprocess and compares our `GET /health` with it.

    python -m benchmarks.plain_health_app --port 8200
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

app = FastAPI()


@app.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8200)
    options = parser.parse_args()
    # uvicorn's defaults (uvloop and httptools when installed), no access log: what a plain server costs.
    uvicorn.run(app, host="127.0.0.1", port=options.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
