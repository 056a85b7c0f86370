"""The one exception type a user sees: the CLI prints its message as one line and exits 2."""


class FinetuneError(Exception):
    """A problem the user can fix. The message says what, where and how to fix it, on one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
