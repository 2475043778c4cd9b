"""Stop sequences and the stream timeout (asyncio)."""

import asyncio

from _common import cap, model_path

from mullama import AsyncModel, StreamConfig, StreamingError


async def main() -> None:
    async with await AsyncModel.load(model_path()) as model:
        config = StreamConfig(max_tokens=cap(100), stop_sequences=("\n\n", "END"))
        stream = await model.generate_stream("Write a short poem:", config)
        async for token in stream:
            print(token.text, end="", flush=True)
        print(f"\n[finished: {stream.finish_reason}]")

        config = StreamConfig(max_tokens=100000, timeout_ms=300, stream_delay_ms=20)
        stream = await model.generate_stream("Count forever:", config)
        try:
            async for token in stream:
                print(token.text, end="", flush=True)
        except StreamingError as exc:
            print(f"\n[{exc}]")


asyncio.run(main())
