"""The one error type a bad recipe raises."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe (file, override or combination of options) that cannot be used.

    The message is meant for the user as is: it names the file, the dotted key and the fix. The CLI prints it
    without a traceback and exits 2. ``problems`` holds one line per problem found (a recipe with three typos
    reports all three at once).
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = problems if problems is not None else [message]
