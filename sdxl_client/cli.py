"""`sdxl-stream`: stream a prompt from the service, show progress, save previews and the final image.

    sdxl-stream "a red fox" --steps 20 --size 512x512 --out fox/

Exits 1 with the server's message when the request is rejected or the generation fails.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path

import httpx
from httpx_sse import connect_sse
from tqdm import tqdm

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png"}


class ServiceError(Exception):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdxl-stream", description=__doc__.split("\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--url", default=os.environ.get("SDXL_SERVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--negative-prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--preview-interval", type=int)
    parser.add_argument("--format", choices=["jpeg", "png"], default="jpeg", help="of the final image")
    parser.add_argument("--num-images", type=int, help="a batch: final_0, final_1, ... (previews show the first)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for previews and the final image")
    parser.add_argument("--api-key", default=os.environ.get("SDXL_SERVE_API_KEY"), help="or $SDXL_SERVE_API_KEY")
    return parser.parse_args(argv)


def build_request(args: argparse.Namespace) -> dict:
    width, _, height = args.size.lower().partition("x")
    body = {
        "prompt": args.prompt,
        "num_inference_steps": args.steps,
        "width": int(width),
        "height": int(height or width),
        "output_format": args.format,
    }
    optional = {
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "guidance_scale": args.guidance_scale,
        "preview_interval": args.preview_interval,
        "num_images": args.num_images,
    }
    return body | {key: value for key, value in optional.items() if value is not None}


def save_image(file: dict, path_without_extension: Path) -> Path:
    path = path_without_extension.with_suffix("." + EXTENSIONS[file["content_type"]])
    path.write_bytes(base64.b64decode(file["url"].split(",", 1)[1]))
    return path


def stream(args: argparse.Namespace) -> dict:
    """Run one generation; return the final event. Raises `ServiceError` with the server's message."""
    args.out.mkdir(parents=True, exist_ok=True)
    headers = {"authorization": f"Key {args.api_key}"} if args.api_key else {}
    body = build_request(args)
    with (
        httpx.Client(timeout=httpx.Timeout(600, connect=10)) as client,
        connect_sse(client, "POST", args.url.rstrip("/") + "/stream", json=body, headers=headers) as source,
        tqdm(total=body["num_inference_steps"], unit="step", desc="denoising") as progress,
    ):
        if source.response.status_code != 200:
            source.response.read()
            raise ServiceError(_error_message(source.response.status_code, source.response.text))
        for sse in source.iter_sse():
            event = json.loads(sse.data)
            if sse.event == "error":
                raise ServiceError(f"{event['error_type']}: {event['detail']}")
            if event["type"] == "preview":
                progress.update(event["step"] + 1 - progress.n)
                save_image(event["image"], args.out / f"preview_{event['step']:03d}")
            elif event["type"] == "final":
                progress.update(progress.total - progress.n)
                names = ["final"] if len(event["images"]) == 1 else [f"final_{i}" for i in range(len(event["images"]))]
                saved = [save_image(image, args.out / name) for image, name in zip(event["images"], names, strict=True)]
                event["saved_to"] = ", ".join(map(str, saved))
                return event
    raise ServiceError("the stream ended without a result")


def _error_message(status: int, text: str) -> str:
    try:
        error = json.loads(text)
    except ValueError:
        return f"HTTP {status}: {text}"
    detail = error.get("detail")
    if isinstance(detail, list):  # validation errors: one line per field
        detail = "; ".join(f"{'.'.join(map(str, item['loc'][1:]))}: {item['msg']}" for item in detail)
    return f"HTTP {status} {error.get('error_type', '')}: {detail}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        final = stream(args)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except httpx.HTTPError as error:
        print(f"error: cannot reach {args.url}: {error}", file=sys.stderr)
        return 1
    timings = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in final["timings"].items())
    print(f"seed {final['seed']}; {timings}; saved {final['saved_to']}")
    flagged = [index for index, flag in enumerate(final.get("has_nsfw_concepts") or []) if flag]
    if flagged:
        print(f"the safety checker flagged image(s) {', '.join(map(str, flagged))}: saved black", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
