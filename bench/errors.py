"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class BenchError(Exception):
    """Bad input (unknown name, bad rank, malformed file, bad config). Never a bug in the suite."""


def unknown_name(kind: str, name: str, valid) -> BenchError:
    return BenchError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")
