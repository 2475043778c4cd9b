"""A slow consumer: the decoder pauses while ``buffer_size`` tokens wait unread (trio)."""

import trio
from _common import cap, model_path

from mullama import AsyncModel, StreamConfig


async def main() -> None:
    async with await AsyncModel.load(model_path()) as model:
        config = StreamConfig(max_tokens=cap(40), temperature=0.7, buffer_size=4)
        async with await model.generate_stream("Describe the ocean:", config) as stream:
            async for token in stream:
                print(token.text, end="", flush=True)
                await trio.sleep(0.05)  # slower than decoding: memory stays bounded
        print(f"\n[decoder paused {stream.producer_pauses} times; never more than "
              f"{config.buffer_size} tokens buffered]")


trio.run(main)
