"""Handling the errors a stream can raise (trio)."""

import trio
from _common import cap, model_path

from mullama import AsyncModel, ContextOverflowError, GenerationError, MullamaError, StreamConfig, StreamingError


async def main() -> None:
    async with await AsyncModel.load(model_path(), n_ctx=256) as model:
        try:
            await model.generate_stream("word " * 1000, StreamConfig(max_tokens=cap(10)))
        except ContextOverflowError as exc:
            print(f"Prompt too long: {exc}")

        stream = await model.generate_stream("Tell me a story", StreamConfig(max_tokens=cap(40)))
        try:
            async for token in stream:
                print(token.text, end="", flush=True)
        except StreamingError as exc:
            print(f"\nStream error: {exc}")
        except GenerationError as exc:
            print(f"\nGeneration failed: {exc}")
        except MullamaError as exc:
            print(f"\nOther error: {exc}")
        print()


trio.run(main)
