"""Every figure the README quotes from a benchmark is in that benchmark's results file (issue 17).

A README block (paragraph, list item or table row) that names `benchmarks/results/NAME.md` quotes
its decimal figures (97.0%, 0.51x, 1.97x, 41.2 ms) from the files it names: each must appear in one
of those files' markdown or JSON, as written. Figures a block takes from elsewhere (the paper, an
earlier commit) go in a block that names no results file. A figure rounded in the README to fewer
digits than the file holds counts when the file holds a value that rounds to it.
"""
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CITED = re.compile(r"benchmarks/results/([a-z0-9_]+)\.(?:md|json|png)")
FIGURE = re.compile(r"(?<![\w.\-])(\d+\.\d+)(?![\w.]*\d)")


def blocks(text: str) -> list[tuple[int, str]]:
    """README blocks: paragraphs split at blank lines, list items and table rows apart."""
    out, start, lines = [], 0, []
    for n, line in enumerate(text.splitlines() + [""], 1):
        new_item = line.lstrip().startswith(("- ", "* ", "|"))
        if (not line.strip() or new_item or line.startswith("#")) and lines:
            out.append((start, " ".join(lines)))
            lines = []
        if line.strip():
            if not lines:
                start = n
            lines.append(line)
    return out


def numbers(name: str) -> set[str]:
    """Every decimal written in results/NAME.md and NAME.json."""
    found = set()
    md = os.path.join(RESULTS, f"{name}.md")
    if os.path.exists(md):
        with open(md) as f:
            found |= set(re.findall(r"\d+\.\d+", f.read()))
    js = os.path.join(RESULTS, f"{name}.json")
    if os.path.exists(js):
        with open(js) as f:
            def walk(v):
                if isinstance(v, float):
                    found.add(repr(v))
                elif isinstance(v, dict):
                    for x in v.values():
                        walk(x)
                elif isinstance(v, list) and len(v) <= 20:  # not raw per-run timings
                    for x in v:
                        walk(x)
                elif isinstance(v, str):
                    found.update(re.findall(r"\d+\.\d+", v))
            walk(json.load(f))
    return found


def holds(figure: str, held: set[str], percent: bool) -> bool:
    if figure in held:
        return True
    digits = len(figure.split(".")[1])
    value = float(figure)
    for h in held:
        v = float(h) * (100 if percent and float(h) <= 1 else 1)
        if abs(v - value) < 0.5 * 10 ** -digits + 1e-9:
            return True
    return False


def test_readme_figures_come_from_the_results_they_cite():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    missing = []
    for line, block in blocks(text):
        cited = sorted(set(CITED.findall(block)))
        if not cited:
            continue
        held = set().union(*(numbers(name) for name in cited))
        assert held, f"README line {line} cites {cited}: no such results file"
        plain = CITED.sub("", block)
        for m in FIGURE.finditer(plain):
            percent = plain[m.end():m.end() + 1] == "%"
            if not holds(m.group(1), held, percent):
                missing.append(f"line {line}: {m.group(1)}{'%' if percent else ''} not in {', '.join(cited)}")
    assert not missing, "\n".join(missing)
