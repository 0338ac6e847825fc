"""The one kind of error a command line reports as a sentence instead of a traceback.

``UserError`` is raised for problems the user can fix (a bad key, a wrong file, a mismatch between
two files); its message names the thing and the fix. ``alchemist.cli.user_errors`` prints it as one
line, ``error: <message>``, and exits 2. It is a ``ValueError`` so that callers written against
the older plain ``ValueError``s keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A user-fixable problem; the message is one sentence naming the thing and the fix."""
