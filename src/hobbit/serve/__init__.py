"""Serving the runtime: the OpenAI-compatible HTTP server, its request schema, the terminal chat."""
