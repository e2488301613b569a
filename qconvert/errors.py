class QConvertError(Exception):
    """A problem with the user's input or environment: printed as one line, exit code 2."""
