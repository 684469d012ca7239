"""vLLM plugin (work in progress)."""


def register() -> None:
    """vLLM general-plugin entry point."""
