"""The pattern of fal's streaming SDXL example, written here as the peer a user would otherwise pick.

A worker thread runs the pipeline; its step callback decodes TAESD previews and JPEG-encodes them
inline every 5 steps and puts them on a queue; a FastAPI `StreamingResponse` under plain uvicorn
yields them as SSE. Same models (loaded by our `load_models`), for a like-for-like comparison.

    python -m benchmarks.reference_app --port 8100
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import queue
import threading

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from deployments.models import load_models
from serve_app.config import AppConfig
from serve_app.contract.requests import GenerationRequest

app = FastAPI()
models = None


def data_uri(image, quality: int) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


@app.post("/stream")
def stream(request: GenerationRequest) -> StreamingResponse:
    pipeline, decoder = models.pipeline, models.preview_decoder
    events: queue.Queue = queue.Queue()

    def on_step_end(pipe, step, timestep, callback_kwargs):
        if step % 5 == 0:
            with torch.no_grad():
                latents = callback_kwargs["latents"].to(decoder.dtype) / decoder.config.scaling_factor
                decoded = decoder.decode(latents, return_dict=False)[0]
                image = pipeline.image_processor.postprocess(decoded, output_type="pil")[0]
            events.put({"type": "preview", "image": {"url": data_uri(image, 70), "content_type": "image/jpeg"}})
        return callback_kwargs

    def run() -> None:
        # Unlike fal's example, a failure ends the stream: the benchmark must not wait forever.
        try:
            result = pipeline(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                num_inference_steps=request.num_inference_steps,
                width=request.width,
                height=request.height,
                guidance_scale=request.guidance_scale,
                generator=torch.Generator(device=models.device).manual_seed(request.seed or 0),
                callback_on_step_end=on_step_end,
            )
            image = {"url": data_uri(result.images[0], 95), "content_type": "image/jpeg"}
            events.put({"type": "final", "image": image})
        except Exception as error:  # noqa: BLE001 - reported to the client
            events.put({"type": "error", "detail": repr(error)})
            raise
        finally:
            events.put(None)

    def sse():
        worker = threading.Thread(target=run)
        worker.start()
        while (event := events.get()) is not None:
            yield f"data: {json.dumps(event)}\n\n"
        worker.join()

    return StreamingResponse(sse(), media_type="text/event-stream")


def main() -> None:
    global models
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="auto")
    options = parser.parse_args()
    config = AppConfig(model={"source": options.model, "device": options.device})
    models = load_models(config.model, config.previews)
    uvicorn.run(app, host="127.0.0.1", port=options.port, log_level="warning")


if __name__ == "__main__":
    main()
