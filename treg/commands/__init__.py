"""The programs of `python -m treg NAME`, one module each with a `main(argv)`; solve.py stays at the top."""
import importlib
import sys


def dispatch(argv, table, package, usage, kind, hint=""):
    """Run `package.NAME.main(rest)` for argv = [NAME, *rest] with NAME a key of `table`; print `usage` for no
    argument or -h/--help. Only the chosen module is imported, so --help and a typo cost no torch import."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return
    name, rest = argv[0], argv[1:]
    if name not in table:
        sys.exit(f"error: no {kind} {name!r}; choose from {', '.join(table)}{hint}")
    importlib.import_module(f"{package}.{name}").main(rest)
