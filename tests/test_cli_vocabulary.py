"""One vocabulary across every ``rcnn`` command: shared option names, flags, choices and defaults,
workflow panels, ``--version`` and one-line usage errors."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict

import pytest
import typer
from typer.testing import CliRunner

from rcnn import __version__
from rcnn.cli import app
from rcnn.cli.app import WORKFLOW
from rcnn.device import PRECISIONS
from rcnn.features import MODES as FEATURE_MODES
from rcnn.proposals import MODES as PROPOSAL_MODES

# the shared vocabulary: long option -> its short flag (None: none) and, where it has them, its choices
SHARED = {
    "--split": ("-s", None),
    "--output": ("-o", None),
    "--workers": ("-j", None),
    "--mode": ("-m", FEATURE_MODES),  # feature mode, never anything else
    "--proposals": (None, PROPOSAL_MODES),  # proposal mode
    "--precision": (None, PRECISIONS),
    "--device": (None, None),
}
# python parameter names that must be spelled with the shared option above
SHARED_PARAMS = {"split": "--split", "output": "--output", "workers": "--workers", "mode": "--mode",
                 "proposals": "--proposals", "precision": "--precision", "device": "--device"}
# a Python identifier path such as rcnn.dedup.DEFAULT_THRESHOLD, or a tuple repr such as ('voc07', 'voc2010')
CODE = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]\w*\.[A-Za-z_]\w*|\('|\[\s*'")
RST = re.compile(r"``|:(class|func|meth|mod|attr):`")

GROUP = typer.main.get_command(app)
COMMANDS = GROUP.commands


def _is_argument(p) -> bool:
    return p.param_type_name == "argument"


def _options(cmd):
    return [p for p in cmd.params if not _is_argument(p) and p.name != "help"]


def _flags(p) -> tuple[str | None, list[str]]:
    """(long name, short flags) of an option; the long name of --a/--no-a is --a."""
    longs = [o for o in p.opts if o.startswith("--")]
    shorts = [o for o in p.opts if not o.startswith("--")]
    return (longs[0] if longs else None), shorts


def _choices(p):
    for holder in (getattr(p, "type", None), getattr(p, "type_descriptor", None)):
        c = getattr(holder, "choices", None)
        if c:
            return tuple(str(getattr(x, "value", x)) for x in c)
    return None


def _ctx(name):
    return COMMANDS[name].make_context(name, [], parent=GROUP.make_context("rcnn", [name]), resilient_parsing=True)


def test_every_command_is_in_one_workflow_panel_in_order():
    listed = [n for names in WORKFLOW.values() for n in names]
    assert sorted(listed) == sorted(COMMANDS), "add new commands to rcnn.cli.app.WORKFLOW"
    assert len(COMMANDS) >= 23
    ctx = GROUP.make_context("rcnn", ["--help"], resilient_parsing=True)
    assert GROUP.list_commands(ctx) == listed
    for panel, names in WORKFLOW.items():
        assert all(COMMANDS[n].rich_help_panel == panel for n in names)
    text = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    titles = [t for t, names in WORKFLOW.items() if names]
    pos = [text.find(f"─ {t} ") for t in titles]
    assert all(p >= 0 for p in pos) and pos == sorted(pos), text


def test_shared_options_mean_the_same_everywhere():
    shorts_of, longs_of, choices_of = defaultdict(set), defaultdict(set), defaultdict(set)
    for name, cmd in COMMANDS.items():
        for p in _options(cmd):
            long, shorts = _flags(p)
            assert long is not None, f"{name}: {p.opts} has no long name"
            assert len(shorts) <= 1, f"{name}: {p.opts}"
            short = shorts[0] if shorts else None
            shorts_of[long].add(short)
            if short:
                longs_of[short].add(long)
            if long in SHARED:
                choices_of[long].add(_choices(p))
            if p.name in SHARED_PARAMS:
                assert long == SHARED_PARAMS[p.name], f"{name}: {p.name} is spelled {long}"
    for long, shorts in shorts_of.items():
        assert len(shorts) == 1, f"{long} has short flags {shorts} in different commands"
    for short, longs in longs_of.items():
        assert len(longs) == 1, f"{short} means {longs} in different commands"
    for long, (short, choices) in SHARED.items():
        if long in shorts_of:
            assert shorts_of[long] == {short}, long
        if choices is not None and long in choices_of:
            assert choices_of[long] == {tuple(choices)}, f"{long}: {choices_of[long]}"
    assert longs_of["-m"] == {"--mode"} and longs_of["-s"] == {"--split"} and longs_of["-j"] == {"--workers"}
    for old in ("--out-dir", "--threads", "--data", "--dataset", "--tap"):
        assert old not in shorts_of, f"{old} is not in the vocabulary"


def test_datasets_are_positional():
    for name, cmd in COMMANDS.items():
        for p in cmd.params:
            if p.name in ("dataset", "data"):
                assert _is_argument(p), f"{name}: {p.name} must be the positional DATASET"


def test_help_shows_plain_defaults_and_choices():
    for name, cmd in COMMANDS.items():
        assert not RST.search(cmd.help or ""), f"{name}: RST markup in its help"
        assert not CODE.search(cmd.help or ""), f"{name}: code in its help"
        ctx = _ctx(name)
        for p in cmd.params:
            text = p.help or ""
            assert not RST.search(text) and not CODE.search(text), f"{name} {p.name}: {text!r}"
            if _is_argument(p) or p.name == "help":
                continue
            # a default is shown by the framework only: a help text naming one contradicts it sooner or later
            assert not re.search(r"\bdefault\b", text, re.I), f"{name} {p.opts}: default in the help text"
            if p.required or (p.is_flag and not p.secondary_opts):
                continue
            record = p.get_help_record(ctx)[1]
            m = re.search(r"\[default: ([^\]]*)\]", record)
            assert m, f"{name} {p.opts}: no default shown ({record!r})"
            assert not CODE.search(m.group(1)), f"{name} {p.opts}: default {m.group(1)!r}"


def test_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output == f"rcnn {__version__}\n"


@pytest.mark.parametrize("args, words", [
    (["propose", "data", "--workers", "many"], ["--workers", "'many'", "integer"]),
    (["evaluate-dets", "dets.json", "data", "--metric", "coco"], ["--metric", "'coco'", "voc07"]),
    (["features", "data", "--mode", "fast"], ["--mode", "warp"]),
    (["train"], ["dataset"]),
    (["info", "data", "--bogus"], ["--bogus"]),
    (["segment-train", "data", "-o", "m.st", "--strategy", "bogus"], ["--strategy", "full+fg"]),
    (["nonsense"], ["nonsense"]),
])
def test_usage_errors_are_one_line(args, words):
    r = CliRunner().invoke(app, args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert all(w in lines[0] for w in words), lines[0]


def test_usage_error_from_the_installed_entry_point():
    r = subprocess.run([sys.executable, "-c", "from rcnn.cli import main; main()", "propose", "x", "-j", "abc"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: invalid value for --workers"), r.stderr
