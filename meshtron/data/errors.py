"""The one error type of meshtron.data: bad input (paths, files, tokenizer specs) reported with what to change.

Invariant: every problem a user can fix by changing their data or options raises `DataError` (a ValueError)
before any tokenising or training work starts, naming the file (and line) at fault.
"""


class DataError(ValueError):
    """Bad training data or tokenizer specification; the message says what to change."""
