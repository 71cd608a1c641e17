"""The programs of `python -m treg NAME`, one module each with a `main(argv)`; solve.py stays at the top."""
import importlib
import sys


def choose(argv, table, usage, kind, hint=""):
    """(NAME, rest) for argv = [NAME, *rest] with NAME a key of `table`; None after printing `usage` for no argument
    or -h/--help; a one-line exit for any other NAME."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return None
    if argv[0] not in table:
        sys.exit(f"error: no {kind} {argv[0]!r}; choose from {', '.join(table)}{hint}")
    return argv[0], argv[1:]


def dispatch(argv, table, package, usage, kind, hint=""):
    """Run `package.NAME.main(rest)` for the NAME that `choose` picks. Only the chosen module is imported, so --help
    and a typo cost no torch import."""
    chosen = choose(argv, table, usage, kind, hint)
    if chosen:
        name, rest = chosen
        importlib.import_module(f"{package}.{name}").main(rest)
