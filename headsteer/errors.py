"""The one exception type users see: a one-line message that names the fix."""


class HeadsteerError(ValueError):
    """Bad input (architecture, heads, image, checkpoint, data); the message says what to do."""
