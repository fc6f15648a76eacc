"""Ctrl-C: in `galaxy chat` it stops the reply and the chat goes on; an interrupted `galaxy run`
ends the generated text's line before saying so."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time


def _read_until(proc: subprocess.Popen, marker: str, timeout: float = 300.0, after: int = 0) -> str:
    """stdout until `marker` has appeared and then `after` more characters (or the process ended)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen, deadline = "", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            at = seen.find(marker)
            if at >= 0 and len(seen) >= at + len(marker) + after:
                return seen
            if sel.select(timeout=1.0):
                chunk = os.read(proc.stdout.fileno(), 4096).decode(errors="replace")
                if not chunk:
                    return seen
                seen += chunk
        raise AssertionError(f"no {marker!r} in {timeout:.0f} s; stdout so far: {seen!r}")
    finally:
        sel.close()


def _sigint_default() -> None:
    """A suite started in the background (`pytest ... &` from a script) runs with SIGINT ignored, and a
    child inherits that: the command would never see the Ctrl-C (both tests failed so, after running
    the whole generation). Give it the disposition a terminal's Ctrl-C reaches."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _galaxy(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "galaxy.cli", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_sigint_default)


def test_ctrl_c_in_chat_stops_the_reply_and_the_chat_goes_on(smollm2_path):
    proc = _galaxy("chat", "--local", "1", "--max-new-tokens", "200")
    try:
        proc.stdin.write(b"Tell me a long story about a dragon.\n")
        proc.stdin.flush()
        out = _read_until(proc, "model> ", after=20)  # the reply has begun
        proc.send_signal(signal.SIGINT)  # to the coordinator alone: its workers run in sessions of their own
        out += _read_until(proc, "you> ")
        assert " [stopped]\n" in out
        proc.stdin.write(b"What is the capital of France?\n/exit\n")
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert "Paris" in rest.decode()


def test_interrupted_run_says_so_on_a_new_line(smollm2_path):
    proc = _galaxy("run", "--local", "1", "--prompt", "Tell me a long story about a dragon.", "--max-new-tokens", "300")
    try:
        _read_until(proc, "", after=20)  # some of the text is out
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.decode().splitlines()[-1] == "galaxy run: interrupted"
    assert out.decode().endswith("\n")
