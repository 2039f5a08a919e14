"""`python -m prunekit` runs the CLI."""

from prunekit.cli import main

if __name__ == "__main__":
    main()
