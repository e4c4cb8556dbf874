"""The one exception type that means "the user's input is wrong" (exit code 2, no traceback)."""


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""


class RunStopped(Exception):
    """A run stopped on purpose (e.g. a non-finite loss); the message says why and what was kept (exit 1)."""
