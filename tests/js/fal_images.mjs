// Usage: node fal_images.mjs <service base url> <json input> <png file> [mask png file]
// Calls fast-sdxl's image-to-image (or, with a mask, inpainting) as fal's docs do: the images are `Blob`s in
// the input, which the unmodified @fal-ai/client uploads first (fal.storage: initiate, then a PUT), then
// `fal.subscribe`. Prints one JSON line: the request id, the result's data, and where an upload lands.
import { readFileSync } from "node:fs";
import { useService } from "./local_fal.mjs";

const [baseUrl, inputJson, imagePath, maskPath] = process.argv.slice(2);
const fal = useService(baseUrl);
const png = (path) => new Blob([readFileSync(path)], { type: "image/png" });

const input = { ...JSON.parse(inputJson), image_url: png(imagePath) };
if (maskPath) input.mask_url = png(maskPath);
const endpoint = maskPath ? "fal-ai/fast-sdxl/inpainting" : "fal-ai/fast-sdxl/image-to-image";
const uploadedUrl = await fal.storage.upload(png(imagePath)); // the same protocol subscribe uses for Blobs
const result = await fal.subscribe(endpoint, { input, pollInterval: 100 });
console.log(JSON.stringify({ requestId: result.requestId, data: result.data, uploadedUrl }));
