"""The one exception type a user sees: the CLI prints its message as one line and exits 2."""

import errno

# The libraries that write our files (safetensors, torch, pyarrow) raise their own types for a full disk;
# what they share is the system's message.
DISK_FULL = {
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EFBIG: "File too large",
}


class FinetuneError(Exception):
    """A problem the user can fix. The message says what, where and how to fix it, on one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


def first_line(error: BaseException) -> str:
    """A library exception's first line, to quote inside a one-line error (its own type name if it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def disk_full(error: BaseException) -> str | None:
    """The system's reason when the error, or one it came from, is a full disk (or a file-size limit); else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return DISK_FULL[error.errno]
        for reason in DISK_FULL.values():
            if reason in str(error):
                return reason
        error = error.__cause__ or error.__context__
    return None
