"""Logging to stdout and <run>/log.txt; JSON-lines records (<run>/metrics.jsonl)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path


def check_output_dir(path: str | Path) -> None:
    """Refuse an output folder that is, or lies under, an existing file (mkdir would raise FileExistsError or
    NotADirectoryError deep inside the command)."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"output folder {path}: {existing} is a file, expected a folder or a path that does not exist")


def setup_logging(run_dir: Path | None, main_process: bool = True, name: str = "pin") -> logging.Logger:
    """Logger `name` writing to stdout and `<run_dir>/log.txt` (main process; others log warnings only); returns it.
    A `run_dir` that is a file is a ValueError (`check_output_dir`)."""
    if run_dir is not None:
        check_output_dir(run_dir)
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if run_dir is not None and main_process:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(run_dir) / "log.txt")
        file.setFormatter(fmt)
        logger.addHandler(file)
    return logger


def append_record(path: Path, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path``."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def record_step(line: str) -> float:
    """The step of a JSON-lines record; infinity for a line cut short by a crash (dropped with the later steps)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def trim_records(path: Path, step: int) -> None:
    """Drop the records of a JSON-lines file past ``step``, where a run (re)starts: a run resumed from an older
    checkpoint writes them again, so each step keeps one record."""
    if path.exists():
        text = path.read_text()
        kept = [r + "\n" for r in text.splitlines() if record_step(r) <= step]
        if "".join(kept) != text:  # via a temporary file: a kill while it is written loses no record
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
