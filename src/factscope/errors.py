"""The one exception type the CLI turns into a single line on stderr and a non-zero exit."""


class FactscopeError(Exception):
    """A problem with the user's input or environment, stated so the user can fix it."""
