"""Prometheus text exposition of the server's counters, gauges and histograms.

Small on purpose: a few metric kinds, rendered in the text format (0.0.4)
that Prometheus scrapes. Values change only on the event loop's thread.
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterable

__all__ = ["Metrics", "Counter", "Histogram"]

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(key)} {_num(value)}"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        running = 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            yield f'{self.name}_bucket{{le="{bound}"}} {running}'
        yield f'{self.name}_bucket{{le="+Inf"}} {self.count}'
        yield f"{self.name}_sum {_num(self.sum)}"
        yield f"{self.name}_count {self.count}"


class Metrics:
    """Everything ``GET /metrics`` reports. Gauges are read when scraped."""

    def __init__(self) -> None:
        self.requests = Counter("mullama_requests_total", "HTTP requests and WebSocket sessions by path and status.")
        self.prompt_tokens = Counter("mullama_prompt_tokens_total", "Prompt tokens of started generations.")
        self.generated_tokens = Counter("mullama_generated_tokens_total", "Tokens generated and sent.")
        self.streams = Counter("mullama_streams_total", "Generations that ended, by endpoint and finish reason.")
        self.ttft = Histogram("mullama_time_to_first_token_seconds",
                              "From the start of a generation to its first token.", LATENCY_BUCKETS)
        self.inter_token = Histogram("mullama_inter_token_seconds",
                                     "Time between consecutive tokens of a stream.", STEP_BUCKETS)
        self.prompt_tokens.inc(0)
        self.generated_tokens.inc(0)
        self.active = 0
        self.gauges: list[tuple[str, str, Callable[[], float]]] = [
            ("mullama_active_streams", "Generations the server is streaming now.", lambda: self.active),
        ]

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges.append((name, help_text, read))

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.prompt_tokens, self.generated_tokens, self.streams):
            lines.extend(metric.render())
        lines.extend(self.ttft.render())
        lines.extend(self.inter_token.render())
        for name, help_text, read in self.gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_num(read())}"]
        return "\n".join(lines) + "\n"
