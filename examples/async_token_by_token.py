"""Token-by-token iteration with ``await stream.next()`` (trio), then ``async for``."""

import trio
from _common import cap, model_path

from mullama import AsyncModel, StreamConfig


async def main() -> None:
    async with await AsyncModel.load(model_path()) as model:
        config = StreamConfig(max_tokens=cap(200), temperature=0.7)
        stream = await model.generate_stream("Tell me about AI", config)
        print("AI: ", end="", flush=True)
        while (token := await stream.next()) is not None:
            print(token.text, end="", flush=True)
        print(f"\nGenerated {stream.tokens_generated} tokens")

        async with await model.generate_stream("Tell me about Rust", config) as stream:
            async for token in stream:
                print(token.text, end="", flush=True)
        print()


trio.run(main)
