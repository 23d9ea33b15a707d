// Usage: node fal_queue.mjs <service base url> <json input> <polling|streaming|queue>
// Drives the unmodified @fal-ai/client's queue API against the service through one requestMiddleware
// (the README's), and prints one JSON line with what the client returned.
import { useService } from "./local_fal.mjs";

const [baseUrl, inputJson, mode] = process.argv.slice(2);
const input = JSON.parse(inputJson);

const fal = useService(baseUrl);

const statuses = [];
let logs = [];
const onQueueUpdate = (update) => {
  statuses.push(update.status);
  // Each update carries every log so far (a poll answers them all; the stream's client accumulates them).
  if (update.logs) logs = update.logs.map((log) => log.message);
};

if (mode === "polling" || mode === "streaming") {
  const result = await fal.subscribe("local/sdxl", { input, logs: true, mode, pollInterval: 100, onQueueUpdate });
  console.log(JSON.stringify({ requestId: result.requestId, seed: result.data.seed, url: result.data.images[0].url, statuses, logs }));
} else {
  const { request_id: requestId } = await fal.queue.submit("local/sdxl", { input });
  let status = await fal.queue.status("local/sdxl", { requestId, logs: true });
  while (status.status !== "COMPLETED") {
    await new Promise((resolve) => setTimeout(resolve, 100));
    status = await fal.queue.status("local/sdxl", { requestId, logs: true });
  }
  const result = await fal.queue.result("local/sdxl", { requestId });
  const slow = await fal.queue.submit("local/sdxl", { input: { ...input, num_inference_steps: 50, width: 512, height: 512 } });
  await fal.queue.cancel("local/sdxl", { requestId: slow.request_id });
  // A running job ends at its next step: wait for it, as a client reading the result would.
  while ((await fal.queue.status("local/sdxl", { requestId: slow.request_id })).status !== "COMPLETED") {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  let cancelError = null;
  try {
    await fal.queue.result("local/sdxl", { requestId: slow.request_id });
  } catch (error) {
    cancelError = { status: error.status, errorType: error.body?.error_type };
  }
  console.log(JSON.stringify({ requestId: result.requestId, seed: result.data.seed, status: status.status, cancelError }));
}
