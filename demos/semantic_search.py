"""Semantic search over local notes with the embedded MiniLM encoder split across 3 devices.

    python demos/semantic_search.py "where did I put the router password?"

Embeds every note once, then ranks them by cosine similarity to the query. Uses only the public
API: galaxy.connect / load / encode.
"""

from __future__ import annotations

import sys

import galaxy

NOTES = [
    "The wifi router password is on a sticker under the router in the hallway cupboard.",
    "Dentist appointment on Thursday at 9:30, bring the insurance card.",
    "The Jetson Nano in the garage runs the security camera pipeline.",
    "Grandma's lemon cake: 200 g flour, 180 g sugar, 3 eggs, two lemons.",
    "Car service due at 90,000 km; last oil change in March.",
    "The spare house key is with the neighbours at number 12.",
]


def main() -> int:
    query = " ".join(sys.argv[1:]) or "where did I put the router password?"
    try:
        with galaxy.connect(local=3) as cluster:
            encoder = cluster.load("minilm", weights=[0.9, 0.6, 0.45])  # an uneven split, like mixed devices
            notes = encoder.encode(NOTES)  # (n, 384), L2-normalised
            q = encoder.encode(query)
    except galaxy.GalaxyError as e:
        print(f"search: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    scores = notes @ q
    print(f"query: {query}")
    for i in scores.argsort()[::-1][:3]:
        print(f"  {scores[i]:.3f}  {NOTES[i]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
