"""User-facing errors.

Anything the user can fix (bad flags, a mesh that does not fit, a missing file) raises
`SpmdError`. The CLI prints its message as one line on stderr and exits with status 2;
everything else is a bug and keeps its traceback.
"""


class SpmdError(ValueError):
    """Bad input that the user can fix. The message is one line and names the culprit."""


class SaveFailed(SpmdError):
    """A checkpoint write failed. orbax may leave threads waiting on that write until its
    coordination timeout (many minutes), so the CLI ends without waiting for them."""
