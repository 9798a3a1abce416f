"""Error classes raised by more than one layer, at the bottom of the package: this module imports
nothing from the project, so the model adapters (``models/``) and the parallelism applied to them
(``parallel/``) can both raise them without importing each other. ``commands/cli.py``'s ``USER_ERRORS``
gathers every error a user can cause."""


class ModelError(ValueError):
    """A model that cannot be loaded or used as asked; one line naming the cause."""


class TrainingError(RuntimeError):
    """Training cannot go on; one line saying why and what is kept."""


__all__ = ["ModelError", "TrainingError"]
