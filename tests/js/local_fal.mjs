// The README's one requestMiddleware: fal's three hosts mapped onto the service at `baseUrl`, the queue
// under /queue/, runs and streams at the root, and uploads (fal.storage) at the root too, so every fal.*
// call stays as it is written for fal.
import { fal } from "@fal-ai/client";

export function useService(baseUrl) {
  fal.config({
    credentials: "local-key",
    requestMiddleware: async (request) => ({
      ...request,
      url: request.url
        .replace(/^https:\/\/queue\.fal\.run\//, `${baseUrl}/queue/`)
        .replace(/^https:\/\/fal\.run\//, `${baseUrl}/`)
        .replace(/^https:\/\/rest\.fal\.ai\//, `${baseUrl}/`),
    }),
  });
  return fal;
}
