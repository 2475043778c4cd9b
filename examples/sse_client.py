"""Read an SSE stream from sse_server.py (or ``mullama serve``) and print tokens as they come.

    python sse_client.py http://127.0.0.1:3000 "The future of AI is" [max_tokens]
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

from _common import cap


def stream_chat(base_url: str, prompt: str, max_tokens: int) -> str:
    request = urllib.request.Request(f"{base_url}/stream", method="POST",
                                     data=json.dumps({"prompt": prompt, "max_tokens": max_tokens}).encode(),
                                     headers={"Content-Type": "application/json"})
    text = ""
    count = 0
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:  # one line at a time, as the server flushes them
            line = raw.decode().rstrip("\n")
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["done"]:
                break
            print(event["token"], end="", flush=True)
            text += event["token"]
            count += 1
    elapsed = time.perf_counter() - start
    print(f"\n[{count} pieces in {elapsed:.2f}s]")
    return text


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:3000"
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Hello!"
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    print(prompt, end="", flush=True)
    stream_chat(url, prompt, cap(limit))
