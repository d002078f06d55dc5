"""Serving a trained run: `engine` (requests -> batched KV-cache decoding), `api` (OpenAI)."""
