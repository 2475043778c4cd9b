"""Basic streaming, a performance line, a temperature comparison and early stopping."""

from _common import cap, model_path

from mullama import Context, Model, SamplerParams

with Model.load(model_path()) as model, Context(model, n_ctx=2048) as ctx:
    print("Mullama Streaming Demo\n======================\n")

    print("--- Basic Streaming ---")
    prompt = "The three laws of robotics are:"
    print(prompt, end="", flush=True)
    for piece in ctx.generate_stream(prompt, max_tokens=cap(100), params=SamplerParams(temperature=0.7)):
        print(piece, end="", flush=True)
    print("\n")

    print("--- Performance Measurement ---")
    stream = ctx.generate_stream("Explain gravity in one paragraph:", max_tokens=cap(150))
    print("> ", end="", flush=True)
    for piece in stream:
        print(piece, end="", flush=True)
    s = stream.stats
    print(f"\n[{s.completion_tokens} tokens in {s.total_time:.2f}s = {s.tokens_per_second:.1f} tok/s]\n")

    print("--- Temperature Comparison ---")
    for temp in (0.1, 0.7, 1.2):
        print(f"temp={temp}: ", end="", flush=True)
        for piece in ctx.generate_stream("Once upon a time", max_tokens=cap(30),
                                         params=SamplerParams(temperature=temp)):
            print(piece, end="", flush=True)
        print()

    print("\n--- Early Stopping (stop at a period) ---")
    text = ""
    print("> ", end="", flush=True)
    for piece in ctx.generate_stream("The meaning of life is", max_tokens=cap(200)):
        print(piece, end="", flush=True)
        text += piece
        if "." in text and len(text) > 50:
            print(" [stopped]")
            break  # leaving the loop stops decoding
    else:
        print()

    print("\n--- Stop sequence ---")
    print(ctx.generate("List three fruits:\n1.", max_tokens=cap(60), stop=["\n3."]))
