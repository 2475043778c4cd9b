"""Several concurrent streams in a trio nursery."""

import trio
from _common import cap, model_path

from mullama import AsyncModel, StreamConfig

PROMPTS = ["The sun is", "Rust is a language that", "My favourite food is", "The ocean is"]


async def main() -> None:
    async with await AsyncModel.load(model_path(), n_parallel=2) as model:
        results = {}

        async def run(i: int, prompt: str) -> None:
            async with await model.generate_stream(prompt, StreamConfig(max_tokens=cap(30))) as stream:
                results[i] = "".join([token.text async for token in stream])

        async with trio.open_nursery() as nursery:
            for i, prompt in enumerate(PROMPTS):
                nursery.start_soon(run, i, prompt)
        for i, prompt in enumerate(PROMPTS):
            print(f"{prompt!r} -> {results[i]!r}")


trio.run(main)
