"""fungi-train: FUNGI trains nothing; this is ``fungi-extract`` under the house's standard script name."""

from fungi.extract import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
