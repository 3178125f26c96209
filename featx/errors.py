"""The one exception type for user mistakes: the CLI prints it as a single line and exits 2."""


class FeatxError(Exception):
    """A problem with the user's input (a path, an option, a file): shown as one line, never a traceback."""

    exit_code = 2
