"""The one base class of every error that is the user's to fix (a bad setting, file or request).

Command-line tools print such an error as one line and exit with status 2 (`ldm.cli.run`); any other exception
is a bug and keeps its traceback. Each package derives its own: `ldm.cli.UsageError`,
`ldm.checkpoint.CheckpointError`, `inversion.embedding.InversionError`.
"""


class UserError(Exception):
    """Bad input or an impossible request, said in one line."""


class SettingError(UserError, ValueError):
    """A bad value for a library setting (an argument or an environment variable such as ONEWORD_ATTENTION)."""
