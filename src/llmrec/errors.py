"""Errors that the CLI reports as one clear line and a non-zero exit."""


class LlmrecError(Exception):
    """Base class of the errors a user can cause (bad input, bad configuration)."""


class DataError(LlmrecError):
    """An input file is missing, empty, corrupt, or does not have the expected schema."""
