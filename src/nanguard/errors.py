"""The one exception type for errors a user can cause (bad file, bad config, bad box).

The CLI prints its message on one line, without a traceback, and exits 2. A message names the file or
key, the id where there is one, and the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (files, config, arguments), never a bug in nanguard."""

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would read like a traceback.
        super().__init__(" ".join(str(message).split()))
