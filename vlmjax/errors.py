"""One exception type for every user-facing problem, so callers can catch it and messages name the fix."""


class VlmJaxError(ValueError):
    """Bad input, checkpoint or configuration. The message says what is wrong and how to fix it."""
