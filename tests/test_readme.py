"""The README's Python snippet runs as written (3 local workers, the embedded models)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_snippet_runs_as_written(smollm2_path, minilm_path, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README should hold one Python snippet"
    script = tmp_path / "snippet.py"
    script.write_text(blocks[0])
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "Paris" in lines[0]
    assert "The capital of Germany is Berlin." in lines  # the streamed text ended its line: the reply has its own
