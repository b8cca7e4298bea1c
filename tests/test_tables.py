"""The result tables in README.md and docs/*.md match bench/results/*.json (bench/tables.py --check)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "bench" / "tables.py"


def run_tables(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TABLES), *args, "--root", str(root)], capture_output=True, text=True)


def test_committed_tables_match_the_json():
    r = run_tables("--check")
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_fails_on_an_edited_table_and_rewrite_restores_it(tmp_path):
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    text = (tmp_path / "README.md").read_text()
    assert "<!-- table:tool-targets -->" in text
    edited = text.replace("| 0.817 (val) |", "| 0.999 (val) |", 1)
    assert edited != text
    (tmp_path / "README.md").write_text(edited)
    r = run_tables("--check", root=tmp_path)
    assert r.returncode == 1 and "README.md" in r.stderr
    assert run_tables(root=tmp_path).returncode == 0
    assert (tmp_path / "README.md").read_text() == text


def test_unknown_table_name_is_refused_with_the_file_name(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("x\n<!-- table:no-such-table -->\n<!-- /table:no-such-table -->\n")
    r = run_tables("--check", root=tmp_path)
    assert r.returncode != 0 and "no-such-table" in r.stderr and "README.md" in r.stderr


def test_readme_test_command_installs_what_ci_installs():
    """The README's test command and .ci/run install the same extras and run the same pytest."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"\*\*Run the tests\*\*.*?```bash\n(.*?)```", readme, re.DOTALL)
    assert block, "README has no 'Run the tests' command block"
    cmd = block.group(1)
    extras = re.findall(r"pip install (?:-q )?-e '(\.\[[^\]]*\])'", ci)
    assert extras and all(e in cmd for e in extras), (extras, cmd)
    assert "--no-deps tidecv" in ci and "--no-deps tidecv" in cmd
    assert "python -m pytest -q" in ci and "python -m pytest -q" in cmd


def code_in(markdown: str) -> list[str]:
    """The code of a Markdown text: fenced blocks (comments after '#' dropped) and inline spans."""
    fenced = re.findall(r"^```[a-z]*\n(.*?)^```", markdown, re.DOTALL | re.MULTILINE)
    lines = [line.split("#", 1)[0] for block in fenced for line in block.splitlines()]
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", markdown, flags=re.DOTALL | re.MULTILINE)
    return lines + re.findall(r"`([^`]+)`", prose)


def test_commands_shown_in_the_docs_exist():
    """Every `rcnn COMMAND` in the code of README.md and docs/*.md names a command of the CLI."""
    from typer.main import get_command

    from rcnn.cli import app

    known = set(get_command(app).commands)
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = set()
    for path in docs:
        for code in code_in(path.read_text()):
            for name in re.findall(r"(?:^|[\s|(])rcnn ([a-z][a-z0-9-]+)", code):
                if name not in known:
                    missing.add(f"{path.name}: rcnn {name}")
    assert not missing, sorted(missing)
