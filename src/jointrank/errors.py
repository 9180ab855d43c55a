"""One exception type for every mistake a user can make; the CLI prints its message and exits non-zero."""


class JointRankError(Exception):
    """Bad input or an impossible request, explained in one sentence."""
