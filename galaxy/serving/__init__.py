"""The OpenAI-compatible endpoint: `openai` (request parsing, pure), `server` (HTTP, streaming), and
`metrics` (Prometheus). Generation requests go to the model's serving engine (galaxy.engine)."""
