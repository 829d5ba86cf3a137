"""scripts/ab.sh: the files of a saved commit swapped in for the A runs, the tree restored after."""
from __future__ import annotations

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_ab_alternates_sides_and_restores_the_tree(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "ab.sh"), repo / "scripts" / "ab.sh")
    (repo / "pkg").mkdir()
    (repo / "pkg" / "f.txt").write_text("old\n")
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "old")
    (repo / "pkg" / "f.txt").write_text("new\n")
    run = lambda *a, **env: subprocess.run(["bash", "scripts/ab.sh", *a], cwd=repo, capture_output=True, text=True,
                                           env={**os.environ, "OUT": str(tmp_path / "out"), **env})
    assert run("--save", "HEAD", "pkg/f.txt").returncode == 0
    assert (repo / "ab_old" / "pkg" / "f.txt").read_text() == "old\n"
    out = run("echo side $(cat pkg/f.txt)", "2", AB_GREP="side").stdout.splitlines()
    assert out == ["[B 1, rc 0] side new", "[A 1, rc 0] side old", "[B 2, rc 0] side new", "[A 2, rc 0] side old"]
    assert (repo / "pkg" / "f.txt").read_text() == "new\n"  # the tree as it was
    failed = run("false; exit 3", "1", AB_GREP="x")  # a failing command: reported, the tree still restored
    assert "[A 1, rc 3]" in failed.stdout and (repo / "pkg" / "f.txt").read_text() == "new\n"
    assert run("--save", "HEAD").returncode == 2  # no files named
