// Usage: node fal_fast_sdxl.mjs <service base url> <json input> <subscribe|run|stream>
// Calls "fal-ai/fast-sdxl" as fal's docs do, with the unmodified @fal-ai/client mapped onto the service by
// the README's requestMiddleware, and prints one JSON line: the result's data (for a stream, the types of
// its events and what stream.done() resolved to).
import { useService } from "./local_fal.mjs";

const [baseUrl, inputJson, mode] = process.argv.slice(2);
const input = JSON.parse(inputJson);

const fal = useService(baseUrl);

if (mode === "subscribe") {
  const result = await fal.subscribe("fal-ai/fast-sdxl", { input, pollInterval: 100 });
  console.log(JSON.stringify({ requestId: result.requestId, data: result.data }));
} else if (mode === "run") {
  const result = await fal.run("fal-ai/fast-sdxl", { input });
  console.log(JSON.stringify({ data: result.data }));
} else {
  const stream = await fal.stream("fal-ai/fast-sdxl", { input });
  const finished = stream.done();
  finished.catch(() => {});
  const types = [];
  for await (const event of stream) types.push(event.type);
  console.log(JSON.stringify({ types, data: await finished }));
}
