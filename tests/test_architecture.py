"""The architecture holds: no import cycles, core never names a lab, labs meet only through public names,
the lab table drives the CLI and the tour, `--help` is fast and complete, a lab's missing package fails alone."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llmcourse
from llmcourse.cli import build_parser, main
from llmcourse.labs import LAB_PACKAGES, labs

SRC = Path(llmcourse.__file__).parent
LAB_NAMES = [p for p in LAB_PACKAGES if p != "llmcourse.core"]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every llmcourse module that ``path`` imports, at module level or inside functions
    (``if TYPE_CHECKING:`` blocks aside)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("llmcourse"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.startswith("llmcourse"):
                for a in node.names:  # `from pkg import submodule` is an edge to the submodule
                    sub = f"{mod}.{a.name}"
                    out.add(sub if sub in modules else mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(me)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {m: _imports(p, set(files)) for m, p in files.items()}


def test_no_import_cycle() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_core_never_imports_or_names_a_lab() -> None:
    graph = _graph()
    for mod, deps in graph.items():
        if not mod.startswith("llmcourse.core"):
            continue
        bad = [d for d in deps if not d.startswith("llmcourse.core")]
        assert not bad, f"{mod} imports {bad}: core must not reach up"
        text = (SRC.parent / (mod.replace(".", "/") + ".py")).read_text() if not (
            SRC.parent / mod.replace(".", "/")).is_dir() else (SRC.parent / mod.replace(".", "/") / "__init__.py").read_text()
        named = [lab for lab in LAB_NAMES if lab in text]
        assert not named, f"{mod} names the lab(s) {named}"


def test_labs_meet_only_through_public_names() -> None:
    graph = _graph()
    for mod, deps in graph.items():
        mine = next((lab for lab in LAB_NAMES if mod == lab or mod.startswith(lab + ".")), None)
        if mine is None:
            continue
        for d in deps:
            other = next((lab for lab in LAB_NAMES if d == lab or d.startswith(lab + ".")), None)
            if other is not None and other != mine:
                assert d == other, f"{mod} imports {d}: use {other}'s public names (from {other} import ...)"


def test_lab_table_declares_every_command_once() -> None:
    seen: dict[str, str] = {}
    for lab in labs():
        assert lab.title and lab.name
        for command in lab.commands:
            assert command not in seen, f"{command} declared by {seen[command]} and {lab.name}"
            seen[command] = lab.name
        if lab.commands:
            assert lab.commands_module
    assert {"models", "generate", "quantize int8", "convert gguf", "eval perplexity"} <= set(seen)


def test_help_is_fast_and_imports_no_torch() -> None:
    code = ("import sys, time; t = time.perf_counter(); from llmcourse.cli import main\n"
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "print(time.perf_counter() - t, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False", "llmcourse --help imported torch"
    best = float(out[0])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmcourse", "--help"], capture_output=True, check=True)
    wall = time.perf_counter() - t0
    assert best < 0.5 and wall < 1.5, (best, wall)  # the process start adds interpreter start-up


def _all_commands() -> list[tuple[list[str], argparse.ArgumentParser]]:
    parser = build_parser()  # every lab's parsers
    out = []

    def walk(p: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append((path, p))
        for a in subs:
            for name, child in a.choices.items():
                walk(child, [*path, name])

    walk(parser, [])
    return out


def test_every_command_help_lists_every_option_with_its_default(capsys) -> None:
    commands = _all_commands()
    assert len(commands) >= 10
    for path, p in commands:
        text = p.format_help()
        assert "examples:" in text, f"`llmcourse {' '.join(path)} --help` has no examples"
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
                continue
            assert action.option_strings[0] in text
            d = action.default
            if d not in (None, False, [], argparse.SUPPRESS) and not isinstance(action, argparse._VersionAction):
                helptext = p._get_formatter()._expand_help(action) if action.help else ""
                assert "default" in helptext.lower(), f"{' '.join(path)} {action.option_strings[0]}: no default shown"
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0
    capsys.readouterr()


def test_a_lab_whose_package_is_missing_fails_alone(monkeypatch, capsys, tmp_path) -> None:
    """A lab that needs an uninstalled package: its command says so in one line (exit 2); others work."""
    pkg = tmp_path / "fakelab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from llmcourse.core.lab import Lab\n"
        "LAB = Lab(name='fake', title='Fake', commands={'fake': 'needs a package that is not there'},\n"
        "          commands_module='fakelab.commands', requires={'surely_not_installed_pkg': "
        "\"pip install 'llmcourse[fake]'\"})\n")
    (pkg / "commands.py").write_text("import surely_not_installed_pkg  # noqa\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import llmcourse.labs as table

    monkeypatch.setattr(table, "LAB_PACKAGES", [*table.LAB_PACKAGES, "fakelab"])
    assert main(["fake"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "surely_not_installed_pkg" in err[0] and "llmcourse[fake]" in err[0]
    with pytest.raises(SystemExit) as e:  # everything else still builds and runs
        main(["--help"])
    assert e.value.code == 0
    assert "fake" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0


def test_tour_exits_non_zero_when_a_section_fails(monkeypatch, tmp_path, capsys) -> None:
    pkg = tmp_path / "brokenlab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from llmcourse.core.lab import Lab\n"
        "LAB = Lab(name='broken', title='Broken', tour='brokenlab.tour:section')\n")
    (pkg / "tour.py").write_text("def section(ctx):\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import llmcourse.labs as table

    monkeypatch.setattr(table, "LAB_PACKAGES", ["brokenlab"])
    out = tmp_path / "tour"
    assert main(["tour", "--quick", "--out", str(out), "--json"]) == 1
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["failed"] == ["broken"] and "boom" in summary["sections"]["Broken"]["error"]
    assert "This section failed" in (out / "index.html").read_text()
