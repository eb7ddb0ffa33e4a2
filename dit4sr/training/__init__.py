"""Training support for ``python -m dit4sr.train``: data synthesis and loading (``data``), Ray Train
data-parallel runs (``distributed``). The trainer and its configuration live in ``dit4sr.train``."""


class TrainingInputError(ValueError):
    """A problem with what the user gave (config, data, device, checkpoint): reported without a traceback."""
