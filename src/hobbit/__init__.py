"""hobbit-moe: run Mixture-of-Experts LLMs bigger than RAM, experts cached at mixed precision."""

__version__ = "0.1.0"
