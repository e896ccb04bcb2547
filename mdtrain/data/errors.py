"""The one error type of the data package: a problem with the user's data, naming the file and what to do."""


class DataError(ValueError):
    """Bad input text, a corrupt or mismatched shard, a tokenizer directory that does not load, ...

    The message always names the file (and line, member or sample where known) and the problem.
    """
