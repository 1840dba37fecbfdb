"""Errors meant for users: the CLI prints their message on one line (no traceback) and exits
non-zero; the GUI shows it in a dialog."""


class UserError(Exception):
    """Bad input the user can fix (a missing path, too few classes, an unwritable file...)."""
