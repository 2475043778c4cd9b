"""Talk to websocket_server.py (or ``mullama serve``'s /ws): two prompts on one connection.

    python websocket_client.py ws://127.0.0.1:8765/ws "Hello!"
"""

from __future__ import annotations

import json
import sys

from _common import cap
from websockets.sync.client import connect


def ask(ws, prompt: str, max_tokens: int) -> str:
    ws.send(json.dumps({"prompt": prompt, "max_tokens": max_tokens}))
    print(prompt, end="", flush=True)
    text = ""
    while True:
        message = json.loads(ws.recv())
        if message["type"] == "token":
            print(message["content"], end="", flush=True)
            text += message["content"]
        elif message["type"] == "done":
            print()
            return text
        else:
            raise RuntimeError(message)


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8765/ws"
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Hello!"
    with connect(url) as ws:
        ask(ws, prompt, cap(100))
        ask(ws, "And one more thing:", cap(50))
