"""README.md and docs/*.md stay honest: short front door, working links, runnable commands, no references
a reader cannot open.

- README.md has at most 250 lines.
- Every relative link (and image) in README.md and docs/*.md points to a file that exists, and a
  ``#fragment`` to a heading of that page.
- No text refers to issue numbers (``issue 14``, ``#14`` outside code), ``reference-spec``, sessions or
  internal notes.
- Every shell command shown (code blocks and inline code) that starts ``python main.py``,
  ``python -m src.<module>``, ``bash <script>.sh`` or ``python benchmarks/<file>.py`` names a file or
  module that exists; the flags of ``python main.py ...`` (and of the main.py runs after ``--`` in
  ``python -m src.sweep ...``) parse with main's argument parser.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 250
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Pages the README links to that are written on other branches: they are checked like any other link,
# so this test fails until they are merged.
EXPECTED_PAGES = ["docs/performance.md", "docs/embedded-benchmark.md", "docs/adding-a-method.md",
                  "docs/published-numbers.md"]

FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "text"}
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FORBIDDEN = [  # (pattern, what it is); checked in prose and code alike
    (re.compile(r"\bissues?[\s-]*#?\d+", re.I), "an issue number"),
    (re.compile(r"reference[\s-]spec", re.I), "the internal reference spec"),
    (re.compile(r"\bsessions?\b", re.I), "a session"),
    (re.compile(r"internal notes?", re.I), "internal notes"),
]
HASH_NUMBER = re.compile(r"(?<![\w&/])#\d+\b")  # checked in prose only (#14 is an issue; code may hold '# 1')
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;", "|&"}
DUPLICATE_FD = re.compile(r"(?<!\S)\d*[<>]>?&\d+(?!\S)")  # 2>&1
REDIRECT = re.compile(r"^\d*(>>?|<)$")  # '> file': the next word is the target
REDIRECT_TO = re.compile(r"^\d*(>>?|<)(?!.*>$)\S+$")  # '>file' (not a placeholder such as <dir>)
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


# ----------------------------------------------------------------------------- reading the pages
def split_page(text: str) -> tuple[list[str], list[str]]:
    """(lines outside code blocks, shell snippets: shell code blocks and inline code spans)."""
    prose, snippets, block, fence = [], [], None, None
    lines = text.splitlines()
    previous_blank = True
    for line in lines:
        match = FENCE.match(line)
        if fence is not None:  # inside a fenced block
            if match and match.group(1) == fence[0]:
                if fence[1] in SHELL_FENCES:
                    snippets.append("\n".join(block))
                fence, block = None, None
            else:
                block.append(line)
            continue
        if match:
            fence, block = (match.group(1), match.group(2).lower()), []
            continue
        if line.startswith("    ") and (previous_blank or block is not None) and not line.lstrip().startswith(("- ", "* ", "|")):
            block = (block or []) + [line[4:]]  # an indented code block
            previous_blank = False
            continue
        if block is not None:
            snippets.append("\n".join(block))
            block = None
        previous_blank = not line.strip()
        snippets.extend(m.group(2).strip() for m in INLINE_CODE.finditer(line))
        prose.append(line)
    if block:
        snippets.append("\n".join(block))
    return prose, snippets


def commands(snippet: str) -> list[list[str]]:
    """The simple commands of a shell snippet: continuations joined, comments, operators, redirections and
    leading environment assignments dropped."""
    text = re.sub(r"\\\n", " ", snippet)
    found = []
    for line in text.splitlines():
        lexer = shlex.shlex(DUPLICATE_FD.sub(" ", line), posix=True, punctuation_chars="();|&")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # not shell (an unbalanced quote in prose-like code)
            continue
        current: list[str] = []
        for token in [*tokens, ";"]:
            if token not in SHELL_OPERATORS:
                current.append(token)
            elif current:
                found.append(current)
                current = []
    cleaned = []
    for command in found:
        while command and ENV_ASSIGNMENT.match(command[0]):
            command = command[1:]
        if command[:1] == ["time"]:
            command = command[1:]
        words, skip = [], False
        for token in command:
            if skip:
                skip = False
            elif REDIRECT.match(token):
                skip = True
            elif not REDIRECT_TO.match(token):
                words.append(token)
        if words:
            cleaned.append(words)
    return cleaned


def shown_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every command in README.md and docs/*.md that this test checks."""
    shown = []
    for page in PAGES:
        for snippet in split_page(page.read_text(encoding="utf-8"))[1]:
            for argv in commands(snippet):
                if (argv[:1] in (["python"], ["python3"]) and len(argv) > 1
                        and (argv[1] == "main.py" or argv[1] == "-m" and len(argv) > 2 and argv[2].startswith("src.")
                             or argv[1].startswith("benchmarks/"))) or (argv[0] == "bash" and len(argv) > 1):
                    shown.append((page.relative_to(ROOT).as_posix(), argv))
    return shown


def build_main_parser():
    """main.py's parser, with the example method of docs/adding-a-method.md registered (its commands use it)."""
    from src.args import build_parser
    from tests.test_new_method import doc_example, registered

    with registered(doc_example()):
        return build_parser()


def parse_error(parser, argv: list[str]) -> str | None:
    """None if argv parses, else argparse's message."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            if exit_.code not in (0, None):  # --help exits 0
                return f"{exit_.code if isinstance(exit_.code, str) else ''} {err.getvalue().strip()}".strip()
    return None


def check_command(argv: list[str], main_parser) -> str | None:
    """None if the command names an existing file/module and its main.py flags parse, else what is wrong."""
    if argv[0] == "bash":
        script = argv[1]
        return None if (ROOT / script).is_file() else f"no file {script}"
    if argv[1] == "main.py":
        return parse_error(main_parser, argv[2:])
    if argv[1] == "-m":
        module = argv[2]
        if importlib.util.find_spec(module) is None:
            return f"no module {module}"
        if module == "src.sweep" and len(argv) > 3:  # sweep flags, then the flags every main.py run gets
            rest = argv[3:]
            cut = rest.index("--") if "--" in rest else len(rest)
            sweep = importlib.import_module(module)
            return parse_error(sweep.build_parser(), rest[:cut]) or \
                (parse_error(main_parser, rest[cut + 1:]) if cut < len(rest) else None)
        return None
    script = argv[1]
    return None if (ROOT / script).is_file() else f"no file {script}"


# ----------------------------------------------------------------------------- links
def github_anchor(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose_of(page: Path) -> list[str]:
    """Lines outside code blocks, inline code removed."""
    return [INLINE_CODE.sub("", line) for line in split_page(page.read_text(encoding="utf-8"))[0]]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for line in split_page(page.read_text(encoding="utf-8"))[0]:
        if re.match(r"#{1,6} ", line):
            slug = github_anchor(line.lstrip("#"))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for line in prose_of(page):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if rel(file) in EXPECTED_PAGES:  # checked by test_pages_written_elsewhere_exist
                continue
            if not file.exists():
                broken.append(f"{target}: no file {rel(file)}")
            elif fragment and file.suffix == ".md" and fragment not in anchors(file):
                broken.append(f"{target}: no heading #{fragment} in {rel(file)}")
    return broken


# ----------------------------------------------------------------------------- tests
def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}); move reference to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_point_to_existing_files(page):
    assert not broken_links(page), "\n".join(broken_links(page))


@pytest.mark.parametrize("name", EXPECTED_PAGES)
def test_pages_written_elsewhere_exist(name):
    assert (ROOT / name).is_file(), f"README.md links to {name}, which does not exist (yet)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_references_a_reader_cannot_open(page):
    text = page.read_text(encoding="utf-8")
    prose = "\n".join(prose_of(page))
    problems = [f"{what}: {m.group(0)!r}" for pattern, what in FORBIDDEN for m in pattern.finditer(text)]
    problems += [f"an issue number: {m.group(0)!r}" for m in HASH_NUMBER.finditer(prose)]
    assert not problems, "\n".join(problems)


def test_shown_commands_exist_and_parse():
    shown = shown_commands()
    assert any(argv[1:2] == ["main.py"] for _, argv in shown)  # the extraction still finds them
    parser = build_main_parser()
    wrong = [f"{page}: {shlex.join(argv)}\n    {problem}"
             for page, argv in shown if (problem := check_command(argv, parser))]
    assert not wrong, "commands in the documentation that would not run:\n" + "\n".join(wrong)


# ----------------------------------------------------------------------------- the checks themselves
def test_the_checks_catch_mistakes(tmp_path):
    parser = build_main_parser()
    snippet = ("    HF_HUB_OFFLINE=1 python main.py --model demo --merge TA --c  # comment\n"
               "    python main.py --model demo --no-such-flag && bash run.sh demo\n"
               "    python -m src.sweep --model demo --launcher local -- --tasks 14 --bogus \\\n"
               "        --threads 2\n"
               "    python -m src.nonexistent\n"
               "    python benchmarks/missing.py > out.txt 2>&1\n")
    prose, snippets = split_page("text\n\n" + snippet + "\nmore `python main.py --alpha x` text\n")
    found = [argv for s in snippets for argv in commands(s)]
    assert found[0] == ["python", "main.py", "--model", "demo", "--merge", "TA", "--c"]
    assert ["bash", "run.sh", "demo"] in found
    assert ["python", "benchmarks/missing.py"] in found
    problems = [check_command(argv, parser) for argv in found]
    assert problems[0] is None and problems[2] is None  # the good ones
    assert "--no-such-flag" in problems[1]
    assert "--bogus" in problems[3]
    assert problems[4] == "no module src.nonexistent"
    assert problems[5] == "no file benchmarks/missing.py"
    assert "--alpha" in problems[6]
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A `code` heading: x\n\n[ok](#a-code-heading-x) [bad](missing.md) "
                    "[frag](#nope) `[not a link](nowhere.md)`\n\nSee issue 14 and #3.\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "#nope"]
    assert [m.group(0) for p, _ in FORBIDDEN for m in p.finditer(page.read_text())] == ["issue 14"]
    assert HASH_NUMBER.findall("\n".join(prose_of(page))) == ["#3"]
