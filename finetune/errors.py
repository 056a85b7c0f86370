"""The one exception type a user sees: the CLI prints its message as one line and exits 2."""


class FinetuneError(Exception):
    """A problem the user can fix. The message says what, where and how to fix it, on one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


def first_line(error: BaseException) -> str:
    """A library exception's first line, to quote inside a one-line error (its own type name if it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
