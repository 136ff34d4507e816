"""The one error type for checkpoint tensors pdbridge cannot place (every architecture's
name mapping raises it or a subclass, so callers catch one type)."""


class WeightError(KeyError):
    """A checkpoint tensor pdbridge cannot place; the message names it."""
