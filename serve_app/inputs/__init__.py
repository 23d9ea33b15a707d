"""Image inputs: where a request's images come from, and how they are checked."""
