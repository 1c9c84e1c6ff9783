"""How the recipe stops: each exception is one line on the console and an exit status (recipes/sft_gemma2.py main)."""


class RecipeError(Exception):
    """A problem with the inputs, reported as one short line and exit status 2."""


class RecipeFinished(Exception):
    """--resume on a run that already reached its planned steps: one line, nothing trained, exit status 0."""


class RecipeInterrupted(Exception):
    """Ctrl-C: what was saved and where, reported as one line and exit status 130."""

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable  # a checkpoint exists that --resume can continue from
