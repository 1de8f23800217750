"""The OpenAI-compatible HTTP server."""

# Defaults the CLI shares without importing FastAPI.
DEFAULT_MAX_QUEUED = 4096  # beyond this many waiting requests, answer 429
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0  # on SIGTERM/SIGINT, how long in-flight requests may finish
