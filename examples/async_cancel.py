"""Cancelling a stream by hand, and with a trio deadline."""

import trio
from _common import cap, model_path

from mullama import AsyncModel, StreamConfig


async def main() -> None:
    async with await AsyncModel.load(model_path()) as model:
        stream = await model.generate_stream("Write a very long essay:", StreamConfig(max_tokens=cap(1000)))
        async for token in stream:
            print(token.text, end="", flush=True)
            if stream.tokens_generated >= cap(20):
                stream.cancel()  # decoding stops within one step
        print(f"\n[cancelled after {stream.tokens_generated} tokens: {stream.finish_reason}]")

        with trio.move_on_after(0.5):  # any trio cancel scope works the same way
            async with await model.generate_stream("Another long essay:",
                                                   StreamConfig(max_tokens=cap(100000))) as stream:
                async for token in stream:
                    print(token.text, end="", flush=True)
        print(f"\n[deadline reached: {stream.finish_reason}]")


trio.run(main)
