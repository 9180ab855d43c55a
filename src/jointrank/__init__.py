"""jointrank: data-free (joint) low-rank compression of LLM weights."""

__version__ = "0.1.0"

from .errors import JointRankError  # noqa: E402
