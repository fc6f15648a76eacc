"""The demos run as an app would run them, and give sensible answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMOS = Path(__file__).resolve().parent.parent / "demos"


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_semantic_search_finds_the_router_note(minilm_path):
    r = _run(DEMOS / "semantic_search.py", "where is the wifi password?")
    assert r.returncode == 0, r.stderr
    best = r.stdout.splitlines()[1]
    assert "router password" in best


def test_assistant_answers_three_questions(smollm2_path):
    r = _run(DEMOS / "assistant.py", "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("model> ") == 3 and "Paris" in r.stdout
