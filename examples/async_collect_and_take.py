"""Collect a whole stream into a string, and take only the first N tokens (asyncio)."""

import asyncio
import itertools

from _common import cap, model_path

from mullama import AsyncModel, StreamConfig


async def main() -> None:
    async with await AsyncModel.load(model_path()) as model:
        config = StreamConfig(max_tokens=cap(60), temperature=0.7)

        stream = await model.generate_stream("Hello", config)
        full_text = "".join([token.text async for token in stream])
        print(f"Full response: {full_text}")

        first_10 = []
        async with await model.generate_stream("Count: 1, 2, 3,", config) as stream:
            async for token in stream:
                first_10.append(token)
                if len(first_10) == 10:
                    break  # leaving `async with` stops generation
        print("First tokens:", [t.text for t in first_10])
        print(list(itertools.islice((t.token_id for t in first_10), 5)))


asyncio.run(main())
