"""The programs of `python -m treg NAME`, one module each with a `main(argv)`; solve.py stays at the top."""
