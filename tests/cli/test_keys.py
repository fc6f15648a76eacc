"""`galaxy keys init keys` from a clone: the cluster CA's key stays out of git, and the command says
where to keep it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from galaxy.cli import main

REPO = Path(__file__).resolve().parent.parent.parent


def test_keys_init_says_where_to_keep_the_ca_key(tmp_path, capsys):
    assert main(["keys", "init", str(tmp_path / "keys"), "--device", "jetson"]) == 0
    out = capsys.readouterr().out
    assert "ca.key signs certificates for the whole cluster: keep it on this machine only, out of version" in out
    assert oct((tmp_path / "keys" / "ca.key").stat().st_mode & 0o777) == "0o600"


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_gitignore_keeps_the_keys_directory_and_private_keys_out_of_git():
    for path in ("keys/ca.key", "keys/jetson.pem", "elsewhere/coordinator.key"):
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert r.returncode == 0, f"{path} is not ignored by .gitignore"
