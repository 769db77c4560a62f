"""OpenAI-compatible HTTP server: protocol (request models), server (FastAPI app, `kvflow serve`),
errors (OpenAI-shaped error responses), metrics (Prometheus)."""
