// Usage: node fal_stream.mjs <service base url> <json input> [url|middleware]
// Streams with the unmodified @fal-ai/client and prints one JSON line per event, then {"done": ...}.
import { fal } from "@fal-ai/client";

const [baseUrl, inputJson, mode = "url"] = process.argv.slice(2);
const input = JSON.parse(inputJson);
const summary = (event) => ({
  type: event.type, step: event.step, url: event.image?.url?.slice(0, 30), seed: event.seed, error_type: event.error_type,
});

let stream;
if (mode === "url") {
  // The stream option `url` sends the request to our host instead of fal's.
  stream = await fal.stream("local/sdxl", { url: `${baseUrl}/stream`, input });
} else {
  // Or rewrite every request's URL with a middleware, keeping fal.stream("<app id>", ...) calls as they are.
  fal.config({
    requestMiddleware: async (request) => ({ ...request, url: `${baseUrl}${new URL(request.url).pathname.replace(/^\/local\/sdxl/, "")}` }),
  });
  stream = await fal.stream("local/sdxl", { input });
}
// done() is taken before the loop: a failed stream rejects it while the loop still runs, and Node
// ends the process on a rejection nobody has attached a handler to yet.
const finished = stream.done();
finished.catch(() => {});
for await (const event of stream) {
  console.log(JSON.stringify({ event: summary(event) }));
}
try {
  const done = await finished;
  console.log(JSON.stringify({ done: summary(done), done_has_images: Array.isArray(done.images) }));
} catch (error) {
  console.log(JSON.stringify({ rejected: { status: error.status, message: error.message } }));
}
