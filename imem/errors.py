"""The one exception type the command line turns into a single clear line and a non-zero exit."""


class ImemError(Exception):
    """A user-facing error: bad input file, unknown id, bad parameter.

    The message must be one line naming the file, id or parameter at fault.
    """
