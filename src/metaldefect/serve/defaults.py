"""The service's default limits, in a module without imports so the CLI can show them cheaply."""

DEFAULT_MAX_UPLOAD_BYTES = 10_000_000
DEFAULT_MAX_CONCURRENCY = 1
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_PIXELS = 64_000_000
