"""Errors that are the user's doing: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (config, data, option value). The message says what is wrong and what is valid."""
