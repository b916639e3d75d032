"""hobbit-moe: run Mixture-of-Experts LLMs bigger than RAM, experts cached at mixed precision."""

__version__ = "0.1.0"
__all__ = ["load", "Engine"]


def __getattr__(name: str):
    # lazy, so the torch-free parts (hobbit.policies, hobbit.runtime.cache) import without torch
    if name in __all__:
        from hobbit.runtime import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'hobbit' has no attribute {name!r}")
