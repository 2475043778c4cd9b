"""Print tokens to the console as they are generated."""

from _common import cap, model_path

from mullama import Context, Model, SamplerParams

with Model.load(model_path()) as model, Context(model, n_ctx=2048) as ctx:
    prompt = "The future of artificial intelligence is"
    print(f"Prompt: {prompt}")
    print("Output: ", end="", flush=True)
    for piece in ctx.generate_stream(prompt, max_tokens=cap(100), params=SamplerParams(temperature=0.8)):
        print(piece, end="", flush=True)
    print()
