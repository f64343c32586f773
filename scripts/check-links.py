#!/usr/bin/env python3
"""Checks the links in the repository's Markdown files (README, docs/, every *.md git tracks).

A relative link must name a file or directory that exists, and its #anchor, if any, a
heading of the Markdown file it names (GitHub's anchors: lower case, punctuation dropped,
spaces as dashes, -1, -2 ... for repeats). Links to other sites (http:, https:, mailto:)
are not fetched: CI runs offline. Links inside code blocks and code spans are ignored.
Usage: scripts/check-links.py [FILE.md ...]   (default: every tracked *.md)
Prints each broken link as FILE:LINE: TARGET: why, and exits 1 if there is one.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# [text](target) and ![alt](target); the target ends at whitespace or ")".
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`+[^`]*`+")


def prose_lines(path):
    """Yields (line number, text) of the lines outside fenced code blocks."""
    fenced = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if FENCE.match(line):
                fenced = not fenced
                continue
            if not fenced:
                yield number, line


def slug(heading):
    """GitHub's anchor for a heading's text."""
    text = CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path, cache={}):
    """The anchors the headings of the Markdown file at `path` define."""
    if path not in cache:
        seen = {}
        found = set()
        for _, line in prose_lines(path):
            m = HEADING.match(line)
            if not m:
                continue
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        cache[path] = found
    return cache[path]


def check(path):
    """The broken links of one Markdown file, as printable lines."""
    problems = []
    here = os.path.dirname(path)
    for number, line in prose_lines(path):
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # another site or scheme: not fetched
            file_part, _, anchor = target.partition("#")
            where = os.path.normpath(os.path.join(here, file_part)) if file_part else path
            rel = os.path.relpath(path, ROOT)
            if not os.path.exists(where):
                problems.append(f"{rel}:{number}: {target}: no such file")
            elif anchor and where.endswith(".md") and anchor not in anchors(where):
                problems.append(f"{rel}:{number}: {target}: no heading #{anchor} there")
    return problems


def main(argv):
    if argv:
        files = [os.path.abspath(a) for a in argv]
    else:
        listed = subprocess.run(
            ["git", "ls-files", "*.md"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.split()
        files = [os.path.join(ROOT, f) for f in listed]
    problems = [p for f in files for p in check(f)]
    for p in problems:
        print(p)
    print(f"checked the links of {len(files)} Markdown files: {len(problems)} broken")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
