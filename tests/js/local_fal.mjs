// The README's one requestMiddleware: fal's two hosts mapped onto the service at `baseUrl`, the queue
// under /queue/ and runs and streams at the root, so every fal.* call stays as it is written for fal.
import { fal } from "@fal-ai/client";

export function useService(baseUrl) {
  fal.config({
    credentials: "local-key",
    requestMiddleware: async (request) => ({
      ...request,
      url: request.url
        .replace(/^https:\/\/queue\.fal\.run\//, `${baseUrl}/queue/`)
        .replace(/^https:\/\/fal\.run\//, `${baseUrl}/`),
    }),
  });
  return fal;
}
