"""fungi-train: FUNGI trains nothing; this is ``fungi-extract`` under the house's standard script name."""

from fungi.config import run_cli
from fungi.extract import main

__all__ = ["cli", "main"]


def cli() -> None:
    """Console-script entry point: ``fungi-extract``, its one-line errors under this command's name."""
    run_cli(main, "fungi-train")


if __name__ == "__main__":
    cli()
