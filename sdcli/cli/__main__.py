"""`python -m sdcli.cli` is `sd` too (tests and benchmarks start it so)."""

from sdcli.cli import main

if __name__ == "__main__":
    main()
