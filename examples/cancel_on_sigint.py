"""Ctrl+C stops generation at once and keeps what was generated.

Closing the stream (leaving the loop) stops the decoder; the signal handler
only sets a flag, the loop checks it between pieces.
"""

from __future__ import annotations

import signal

from _common import cap, model_path

from mullama import Context, Model, SamplerParams


def stream_with_cancellation(ctx: Context, prompt: str, max_tokens: int = 500) -> str:
    cancelled = False

    def on_sigint(signum, frame) -> None:
        nonlocal cancelled
        cancelled = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    output = ""
    try:
        stream = ctx.generate_stream(prompt, max_tokens=max_tokens, params=SamplerParams(temperature=0.7))
        print("> ", end="", flush=True)
        for piece in stream:
            if cancelled:
                stream.close()  # the decoder stops now, not after max_tokens
                print("\n[Generation cancelled]")
                break
            print(piece, end="", flush=True)
            output += piece
        else:
            print()
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"[{stream.stats.completion_tokens} tokens generated, finish reason: {stream.finish_reason}]")
    return output


if __name__ == "__main__":
    with Model.load(model_path()) as model, Context(model, n_ctx=2048) as ctx:
        stream_with_cancellation(ctx, "Tell me a very long story about a dragon:", cap(500))
