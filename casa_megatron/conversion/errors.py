"""The error of a conversion that cannot be done; the message names the tensors or fields."""


class ConversionError(ValueError):
    """Unsupported architecture, missing / unexpected tensors, shape mismatch, existing output."""
