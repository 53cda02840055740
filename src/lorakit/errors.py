"""The one exception type a user can cause; the CLI turns it into one line on stderr."""


class LoraKitError(Exception):
    """A problem with the user's input (config, files, adapter, request), not a bug."""
