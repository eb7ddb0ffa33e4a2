"""The one error type of training that is the user's to fix."""


class TrainingInputError(ValueError):
    """A problem with what the user gave (config, data, device, checkpoint): reported without a traceback."""
