"""Collect every demo's runs/demo/<package>/summary.json into one table (used by `make demo`)."""

import json
import sys
from pathlib import Path


def main(root: str = "runs/demo") -> None:
    rows = []
    for path in sorted(Path(root).glob("*/summary.json")):
        for key, value in json.loads(path.read_text()).items():
            rows.append((path.parent.name, key, f"{value:.4g}" if isinstance(value, float) else str(value)))
    if not rows:
        print(f"no demo summaries under {root}")
        return
    widths = [max(len(r[i]) for r in rows + [("package", "metric", "value")]) for i in range(3)]
    print("\nDemo summary")
    for row in [("package", "metric", "value"), tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main(*sys.argv[1:])
