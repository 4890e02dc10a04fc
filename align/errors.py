"""The one exception type that reaches users as a one-line message (exit code 2)."""


class AlignError(Exception):
    """A problem with the user's input or environment that they can fix.

    The CLI prints ``error: <message>`` on one line and exits with code 2 (a traceback only with
    ``--debug``). Messages say what is wrong, where (file:line, config key, field) and what to do.
    """
