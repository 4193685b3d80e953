"""`python -m defer ...` runs the `defer` command line (used to start local node processes)."""

from defer.cli import main

if __name__ == "__main__":
    main()
