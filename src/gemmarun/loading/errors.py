class LoadError(ValueError):
    """A model file or folder we cannot load; the message is one line naming the problem."""
