"""Several concurrent streams under asyncio."""

import asyncio

from _common import cap, model_path

from mullama import AsyncModel, StreamConfig

PROMPTS = ["The sun is", "Rust is a language that", "My favourite food is", "The ocean is"]


async def main() -> None:
    async with await AsyncModel.load(model_path(), n_parallel=2) as model:
        async def run(prompt: str) -> str:
            async with await model.generate_stream(prompt, StreamConfig(max_tokens=cap(30))) as stream:
                return "".join([token.text async for token in stream])

        texts = await asyncio.gather(*(run(p) for p in PROMPTS))
        for prompt, text in zip(PROMPTS, texts):
            print(f"{prompt!r} -> {text!r}")


asyncio.run(main())
