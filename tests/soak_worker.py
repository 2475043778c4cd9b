"""The soak run, in a process of its own so that its RSS, fds and threads are its own.

    python tests/soak_worker.py MODEL_PATH SCALE

SCALE 1.0 is the full run (5,000 short generations, 1,000 cancelled streams,
1,000 disconnected SSE clients, 200 model load/close cycles); smaller scales
shrink every count. Prints one JSON object: per phase the count and the
samples (iteration, RSS bytes, open fds, threads) plus fitted slopes.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mullama  # noqa: E402
from mullama import AsyncModel, StreamConfig  # noqa: E402

FULL = {"generations": 5000, "cancelled": 1000, "disconnected": 1000, "load_cycles": 200}


def usage() -> tuple[int, int, int]:
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return rss, len(os.listdir("/proc/self/fd")), threading.active_count()


def slope(points: list[tuple[int, float]]) -> float:
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def run_phase(name: str, count: int, step, samples_wanted: int = 20) -> dict:
    every = max(1, count // samples_wanted)
    samples = []
    t0 = time.monotonic()
    for i in range(count):
        step(i)
        if (i + 1) % every == 0 or i + 1 == count:
            gc.collect()
            samples.append((i + 1, *usage()))
    warm = [s for s in samples if s[0] > count // 5] or samples  # the first fifth is warm-up
    return {"phase": name, "count": count, "seconds": round(time.monotonic() - t0, 1), "samples": samples,
            "rss_slope_bytes_per_iter": slope([(s[0], s[1]) for s in warm]),
            "fd_slope_per_iter": slope([(s[0], s[2]) for s in warm]),
            "thread_slope_per_iter": slope([(s[0], s[3]) for s in warm]),
            "after_warmup": warm[0][1:], "end": samples[-1][1:]}


def main(model_path: str, scale: float) -> None:
    from live_server import LiveServer, open_sse_socket, read_events

    counts = {k: max(5, int(v * scale)) for k, v in FULL.items()}
    model = mullama.Model.load(model_path)
    engine = AsyncModel(model, n_ctx=256, n_parallel=4)
    short = StreamConfig(max_tokens=4, temperature=0.0, logprobs=False)
    phases = []

    def generation(i: int) -> None:
        with engine.stream_blocking(f"Item {i % 50}:", short) as stream:
            for _ in stream:
                pass

    phases.append(run_phase("short generations", counts["generations"], generation))

    async def cancel_one(i: int) -> None:
        stream = await engine.generate_stream("Tell me a long story:", StreamConfig(max_tokens=200))
        async with stream:
            await stream.receive()
            await stream.receive()
            stream.cancel()

    phases.append(run_phase("cancelled streams", counts["cancelled"], lambda i: trio.run(cancel_one, i)))

    server = LiveServer(engine)
    try:
        def disconnect(i: int) -> None:
            sock = open_sse_socket(server.port, {"prompt": "Count to one hundred:", "max_tokens": 200})
            try:
                read_events(sock, 2)
            finally:
                sock.close()

        phases.append(run_phase("disconnected SSE clients", counts["disconnected"], disconnect))
        server.wait_idle(30)
    finally:
        server.close()
    engine.close()

    def load_cycle(i: int) -> None:
        with mullama.Model.load(model_path) as m, mullama.Context(m, n_ctx=128) as ctx:
            ctx.generate("Hi", max_tokens=1, params=mullama.SamplerParams(temperature=0))

    phases.append(run_phase("model load/close cycles", counts["load_cycles"], load_cycle))
    print(json.dumps({"counts": counts, "phases": phases}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
