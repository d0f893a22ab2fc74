"""The error type for mistakes a user can fix, and how binaries report it."""


class UserError(ValueError):
  """A bad value in the config, the flags or an input file.

  The message is one line that names the bad value and what would be valid.
  Binaries print it to stderr and exit with status 2, without a traceback.
  """
