"""Engine start-up: each demo model alone, then both together in one process.

Shows whether starting two engines side by side beats starting them one after the other.
Each figure is the median of ROUNDS starts (the compile cache is warm after the first).

    .venv/bin/python bench/startup.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def start(names: list[str], data_dir: Path) -> float:
    from serving import Catalog, EngineHost, load_catalog
    from serving.catalog import default_catalog_path

    full = load_catalog(default_catalog_path(), data_dir)
    host = EngineHost(Catalog([spec for spec in full if spec.name in names]))
    began = time.perf_counter()
    await host.start()
    elapsed = time.perf_counter() - began
    await host.shutdown()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".tollgate")
    args = parser.parse_args()

    from serving.demo import prepare_demo_models

    prepare_demo_models(args.data_dir / "models")
    figures = {}
    for names in (["demo-chat"], ["minilm"], ["demo-chat", "minilm"]):
        runs = [asyncio.run(start(names, args.data_dir)) for _ in range(args.rounds)]
        figures[" + ".join(names)] = statistics.median(runs)
    for label, seconds in figures.items():
        print(f"{label:<20} start {seconds:6.1f} s")
    serial = figures["demo-chat"] + figures["minilm"]
    both = figures["demo-chat + minilm"]
    print(f"side by side {both:.1f} s vs one after the other {serial:.1f} s: {both / serial:.2f}x")


if __name__ == "__main__":
    main()
