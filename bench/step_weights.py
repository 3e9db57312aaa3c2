"""What a prefill token and a decode token cost an engine step: the weights of engine time.

Starts ``tollgate serve`` (keys off) on ``demo-chat`` with ``TOLLGATE_STEP_LOG`` set, so that
the metering scheduler (`serving.metering`) logs every step's prefill tokens, decode tokens
and duration; sends mixes of long prompts with one output token (prefill-heavy) and short
prompts with long outputs (decode-heavy), each at several concurrencies, interleaved; then
fits ``duration = a + b * prefill + c * decode`` by least squares over the steps and prints
``b``, ``c``, the fit's R^2 and the weights ``prefill:decode`` to use, with decode 1 (what
``TOLLGATE_STEP_WEIGHTS`` takes).

    .venv/bin/python bench/step_weights.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import bench_servers  # noqa: E402 (bench/ is the script's folder)

from serving.demo import prepare_demo_models  # noqa: E402 (after the path is set)

servers = bench_servers()

MODEL = "demo-chat"


async def mix(url: str, prompt_words: int, max_tokens: int, concurrency: int) -> None:
    rng = random.Random(prompt_words * 1000 + concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as api:

        async def one() -> None:
            # Distinct words: nothing comes from the prefix cache.
            prompt = " ".join(str(rng.randrange(1000)) for _ in range(prompt_words))
            body = {
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "ignore_eos": True,
            }
            (await api.post("/v1/completions", json=body)).raise_for_status()

        await asyncio.gather(*(one() for _ in range(concurrency)))


def fit(log: Path) -> None:
    rows = np.array([[float(x) for x in line.split()] for line in log.read_text().splitlines()])
    prefill, decode, duration = rows[:, 0], rows[:, 1], rows[:, 3]
    design = np.column_stack([np.ones_like(prefill), prefill, decode])
    (a, b, c), *_ = np.linalg.lstsq(design, duration, rcond=None)
    predicted = design @ np.array([a, b, c])
    r2 = 1 - ((duration - predicted) ** 2).sum() / ((duration - duration.mean()) ** 2).sum()
    print(
        f"{len(rows):,} steps: duration = {a:.3f} ms + {b * 1000:.2f} us x prefill tokens "
        f"+ {c * 1000:.2f} us x decode tokens   (R^2 {r2:.3f})"
    )
    print(f"weights prefill:decode = {b / c:.3f}:1   (TOLLGATE_STEP_WEIGHTS={b / c:.3f}:1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    prepare_demo_models(ROOT / ".tollgate" / "models")
    folder = Path(tempfile.mkdtemp(prefix="tollgate-weights-"))
    log = folder / "steps.log"
    server, _ = servers.start_tollgate(
        "tollgate", folder, TOLLGATE_AUTH="false", TOLLGATE_STEP_LOG=str(log)
    )
    try:
        servers.wait_ready(server)
        log.write_text("")  # the start-up's warm-up steps are not a workload
        mixes = [(words, 1, n) for words in (20, 60, 100) for n in (1, 4, 16)]
        mixes += [(5, 64, n) for n in (1, 8, 32, 96)]
        mixes += [(100, 32, n) for n in (4, 16)]
        for _ in range(args.rounds):
            random.shuffle(mixes)
            for words, tokens, n in mixes:
                asyncio.run(mix(server.base_url, words, tokens, n))
    finally:
        servers.stop(server)
    fit(log)


if __name__ == "__main__":
    main()
