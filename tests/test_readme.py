"""README.md and docs/*.md stay true to the repository: every relative link and image resolves (files and #anchors),
every ```bash command that runs one of the scripts names only flags its --help lists, the notebook parameters a
command sets exist, the tests the prose names exist, the figures are small and each says how it was made, and no
count that drifts with the code (tests, lines) is written down. Each checker is also run on a bad example, so it
can fail."""
import contextlib
import io
import re
import runpy
import shlex
import sys
from functools import cache

import nbformat
import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("train_gpt2.py", "bench.py", "hellaswag.py", "fineweb.py")
FIGURES = ROOT / "docs" / "figures"
MAX_FIGURE_BYTES = 200_000


def page_id(path):
    return str(path.relative_to(ROOT))


# -----------------------------------------------------------------------------
# Markdown, as far as these checks need it

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def code_blocks(text, lang="bash"):
    return [body for tag, body in FENCE.findall(text) if tag == lang]


def prose(text):
    """The text without fenced blocks and inline code: links in code are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def links(text):
    """Targets of [text](target), ![alt](target) and <img src="target">."""
    text = prose(text)
    found = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return found + re.findall(r"<img\s[^>]*src=\"([^\"]+)\"", text)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    heading = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(text):
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", text), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path, text):
    """What is wrong with the relative links of the page at `path` whose text is `text`."""
    errors = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:: not checked here
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve()
        if file and not dest.exists():
            errors.append(f"{target}: no {dest}")
        elif anchor and (not file or dest.suffix == ".md"):
            if anchor not in anchors(dest.read_text() if file else text):
                errors.append(f"{target}: no heading #{anchor} in {dest.name if file else path.name}")
    return errors


# -----------------------------------------------------------------------------
# Commands in ```bash blocks

@cache
def script_flags(script):
    """The options `python SCRIPT --help` lists: run as the command line runs it (in this process, which has
    imported torch already), read from the help's option lines."""
    out, argv = io.StringIO(), sys.argv
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_.value.code in (0, None), f"{script} --help failed"
    flags = set()
    for line in out.getvalue().splitlines():
        if re.match(r"  --?\w", line):  # "  -m MODEL, --model MODEL   help...": the part before the help
            flags.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", re.split(r"\s{2,}", line.strip())[0]))
    assert "--help" in flags, out.getvalue()
    return frozenset(flags)


@cache
def notebook_parameters():
    """The environment variables play.ipynb reads: its first code cell's parameters."""
    nb = nbformat.read(ROOT / "play.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    return frozenset(re.findall(r"os\.environ\.get\(\"(\w+)\"", first.source))


def commands(block):
    """The block's commands as token lists: continuation lines joined, comments dropped, split at ; && || |."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split, lexer.commenters = True, "#"
        command = []
        for token in lexer:
            if token and set(token) <= set(";&|<>"):
                out.append(command)
                command = []
            else:
                command.append(token)
        out.append(command)
    return [c for c in out if c]


def bad_flags(block, flags_of=script_flags):
    """Flags a block passes to one of the scripts that its --help does not list, and play.ipynb parameters that it
    does not read."""
    errors = []
    for command in commands(block):
        script = next((i for i, t in enumerate(command) if t.split("/")[-1] in SCRIPTS), None)
        if script is not None:
            name = command[script].split("/")[-1]
            known = flags_of(name)
            for token in command[script + 1:]:
                flag = token.split("=")[0]
                if re.match(r"--?[A-Za-z]", flag) and flag not in known:
                    errors.append(f"{name} has no {flag}: {shlex.join(command)}")
        if "play.ipynb" in command:
            for token in command:
                name = re.match(r"(\w+)=", token)
                if name and name.group(1) not in notebook_parameters():
                    errors.append(f"play.ipynb has no parameter {name.group(1)}: {shlex.join(command)}")
    return errors


# -----------------------------------------------------------------------------
# The checks

@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_and_images_resolve(page):
    errors = broken_links(page, page.read_text())
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_use_flags_the_scripts_have(page):
    errors = [e for block in code_blocks(page.read_text()) for e in bad_flags(block)]
    assert not errors, "\n".join(errors)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text())}
    assert [page_id(p) for p in PAGES[1:] if p.resolve() not in linked] == []


def test_quickstart_is_one_command():
    """README's quickstart: a heading that starts with "Quickstart", then the command in a ```bash block."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^##+ Quickstart[^\n]*\n(.*?)(?=^##? )", text, re.S | re.M)
    assert section, "no heading that starts with Quickstart"
    first = code_blocks(section.group(1))[0]
    assert commands(first)[0][:2] == ["python", "train_gpt2.py"], first


def test_figures_are_small_linked_and_remade_by_a_command():
    """Each committed figure is under ~200 KB, shown from a page, and docs/figures.md gives the command that makes
    it (play.ipynb with PLOT_FILE=docs/figures/NAME)."""
    pngs = sorted(FIGURES.glob("*.png"))
    assert len(pngs) >= 2
    shown = {(page.parent / t).resolve() for page in PAGES for t in links(page.read_text())}
    made = " ".join(code_blocks((ROOT / "docs" / "figures.md").read_text()))
    for png in pngs:
        assert png.stat().st_size < MAX_FIGURE_BYTES, f"{png.name}: {png.stat().st_size} bytes"
        assert png.resolve() in shown, f"{png.name} is not shown on any page"
        assert f"PLOT_FILE=docs/figures/{png.name}" in made, f"no command in docs/figures.md makes {png.name}"


def test_the_tests_the_docs_name_exist():
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined.update(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    named = {(page_id(p), t) for p in PAGES for t in re.findall(r"\b(test_\w+)\b(?!\.py)", p.read_text())}
    assert sorted((p, t) for p, t in named if t not in defined) == []


DRIFTING = re.compile(r"\b\d[\d,]* (?:tests?|lines|GPU-only skips)\b|\b\w+\.py:\d+|\blines? \d+\b")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_counts_that_drift_with_the_code(page):
    """How many tests there are, or where in a file something is, changes with every commit: say it nowhere."""
    assert DRIFTING.findall(page.read_text()) == []


# -----------------------------------------------------------------------------
# The checkers can fail

def test_checkers_catch_a_bad_link_a_bad_anchor_and_a_bad_flag(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## `--flag` and more\n")
    text = ("# Page\n[ok](other.md#--flag-and-more) [ok](#page) [gone](missing.md) ![gone](fig.png) "
            "[bad anchor](other.md#nowhere) [web](https://example.com) `[code](nowhere.md)`\n")
    assert broken_links(page, text) == [f"missing.md: no {tmp_path / 'missing.md'}",
                                        f"fig.png: no {tmp_path / 'fig.png'}",
                                        "other.md#nowhere: no heading #nowhere in other.md"]
    block = ('python train_gpt2.py --max_steps 2 \\\n    --no_such_flag 1   # a comment --ignored\n'
             'torchrun --nproc_per_node=8 train_gpt2.py --model=d2 --sample "a --quoted one" | tee x.log\n'
             'python hellaswag.py -m gpt2 -x && LOG_FILE=a NO_PARAM=1 jupyter execute play.ipynb\n')
    flags = {"train_gpt2.py": {"--max_steps", "--model", "--sample"}, "hellaswag.py": {"-m"}}
    assert bad_flags(block, flags_of=flags.get) == [
        "train_gpt2.py has no --no_such_flag: python train_gpt2.py --max_steps 2 --no_such_flag 1",
        "hellaswag.py has no -x: python hellaswag.py -m gpt2 -x",
        "play.ipynb has no parameter NO_PARAM: LOG_FILE=a NO_PARAM=1 jupyter execute play.ipynb"]
    assert DRIFTING.findall("162 tests in 6 minutes; its first ~1,800 lines; train_gpt2.py:2760") == \
        ["162 tests", "1,800 lines", "train_gpt2.py:2760"]
