"""Serving many requests: the OpenAI-compatible HTTP endpoint and what schedules its requests."""
