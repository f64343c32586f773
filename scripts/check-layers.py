#!/usr/bin/env python3
"""Checks the manager crates' layering: no import cycles between modules, no global state.

Every `.rs` file of a crate is one module (`src/http/web/mod.rs` is
`http::web`). A module imports another when its code (tests left out) names
it through `crate::…`, `super::…`, `self::…` or child-module paths, `use`
groups included; a path is counted against the deepest module it names. An
import is an edge between the two siblings below their common parent
(`http::web` naming `http::client` is `web -> client` inside `http`;
`service` naming `http::admin` is `service -> http`); a module and its own
submodules may use each other (a parent's items are its children's, as
Rust's privacy has it), so those edges do not count. The script fails if
the edges between siblings form a cycle (it prints each one) or if a crate keeps
mutable global state (`static` atomics, mutexes or lazily set cells; the library crates only).
On success it prints each crate's modules in layer order, lowest first.

Usage: scripts/check-layers.py [CRATE_DIR ...]   (default: manager-core manager baton)
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CRATES = ["manager-core", "manager", "baton"]
# The `baton` command may keep process-wide flags (a signal handler's); the libraries may not.
NO_GLOBAL_STATE = {"manager-core", "manager"}

GLOBAL_STATE = re.compile(
    r"^\s*(pub(\([^)]*\))?\s+)?static\s+(mut\s+)?[A-Z0-9_]+\s*:\s*"
    r"[^=]*\b(Atomic\w+|Mutex|RwLock|OnceLock|OnceCell|LazyLock|Lazy|RefCell|Cell)\b"
)


def module_files(src):
    """Maps module paths (tuples) to their files, for every .rs file under src but tests."""
    tests = test_modules(src)
    modules = {}
    for dirpath, _, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.normpath(os.path.join(dirpath, name))
            if any(path == t or path.startswith(t[: -len("mod.rs") if t.endswith("/mod.rs") else -3] + "/") for t in tests):
                continue  # a test module, or a file of one
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel in (["lib"], ["main"]):
                parts = ()
            elif rel[-1] == "mod":
                parts = tuple(rel[:-1])
            else:
                parts = tuple(rel)
            if rel[0] == "bin":
                continue  # extra binaries are crates of their own
            modules.setdefault(parts, path)
    return modules


def strip_comments_and_strings(text):
    """The text with comments removed and string and char literals emptied (a small lexer)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif (c in "rb") and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")) and re.match(
            r'(br|r)(#*)"', text[i:]
        ):
            m = re.match(r'(br|r)(#*)"', text[i:])
            end = text.find('"' + m.group(2), i + len(m.group(0)))
            out.append('""')
            i = n if end < 0 else end + 1 + len(m.group(2))
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            out.append('""')
            i += 1
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^'\\])'", text[i:])
            if m:  # a char literal; otherwise a lifetime
                out.append("' '")
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def code_of(path):
    """The file's code without comments, literals and inline `#[cfg(test)] mod … { … }` blocks."""
    text = strip_comments_and_strings(open(path, encoding="utf-8").read())
    inline_test = re.compile(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s*)?mod\s+\w+\s*\{")
    while True:
        m = inline_test.search(text)
        if not m:
            return text
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        text = text[: m.start()] + text[i:]


def test_modules(src):
    """Files that are test modules (`#[cfg(test)] mod name;`), to leave out."""
    out = set()
    for dirpath, _, files in os.walk(src):
        for fname in files:
            if not fname.endswith(".rs"):
                continue
            path = os.path.join(dirpath, fname)
            text = strip_comments_and_strings(open(path, encoding="utf-8").read())
            here = dirpath if fname in ("mod.rs", "lib.rs", "main.rs") else path[:-3]
            for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s*)?mod\s+(\w+)\s*;", text):
                for cand in (os.path.join(here, m.group(1) + ".rs"), os.path.join(here, m.group(1), "mod.rs")):
                    out.add(os.path.normpath(cand))
    return out


def expand_use_groups(code, keep_alias=False):
    """Yields every path a `use` declaration names, with `{a, b::{c, d}}` groups expanded
    (with its `as` alias when `keep_alias`)."""

    def expand(prefix, tree):
        tree = tree.strip()
        if not tree:
            return
        if tree.endswith("}") and "{" in tree:
            head, body = tree.split("{", 1)
            body = body[:-1]
            depth, start = 0, 0
            for i, ch in enumerate(body + ","):
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                elif ch == "," and depth == 0:
                    yield from expand(prefix + head, body[start:i])
                    start = i + 1
        else:
            yield prefix + (tree if keep_alias else re.split(r"\s+as\s+", tree)[0].strip())

    for m in re.finditer(r"\buse\s+([^;]+);", code):
        tree = re.sub(r"\s+", " ", m.group(1))
        yield from expand("", re.sub(r"\s*(::|[{},])\s*", r"\1", tree))


def reexports(code, here, modules):
    """The names module `here` re-exports (`pub use a::b::Thing`), each with the module it
    comes from: a path through `here::Thing` is a path into that module."""
    out = {}
    for m in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", code):
        tree = re.sub(r"\s+", " ", m.group(1))
        tree = re.sub(r"\s*(::|[{},])\s*", r"\1", tree)
        for spec in expand_use_groups(f"use {tree};", keep_alias=True):
            alias = re.search(r"\s+as\s+(\w+)\s*$", spec)
            path = spec if not alias else spec[: alias.start()]
            item = (alias.group(1) if alias else path.split("::")[-1]).strip()
            source = resolve(path, here, modules)
            if source is not None and source != here and item != "*":
                out[item] = source
    return out


def referenced_paths(code):
    """Every path the code names, as written (`crate::a::b`, `super::c`, `child::d`)."""
    seen = set(expand_use_groups(code))
    for m in re.finditer(r"(?<![\w:])((?:\w+)(?:::\w+)+)", code):
        seen.add(m.group(1))
    return seen


def resolve(path, here, modules, exported=None):
    """The deepest module `path` names, seen from module `here`; None outside the crate.
    With `exported` (module -> {name: module}), a re-exported name leads to its module."""
    parts = path.split("::")
    if parts[0] == "crate":
        base, rest = (), parts[1:]
    elif parts[0] in ("super", "self"):
        base = here
        while parts and parts[0] in ("super", "self"):
            if parts[0] == "super":
                base = base[:-1]
            parts = parts[1:]
        rest = parts
    elif here + (parts[0],) in modules:
        base, rest = here, parts  # a child module, named from its parent
    else:
        return None
    target = base
    for p in rest:
        if target + (p,) in modules:
            target = target + (p,)
        elif exported and p in exported.get(target, {}):
            target = exported[target][p]
        else:
            break
    return target


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layers(graph):
    """Each module's layer: 0 for modules importing nothing, else one above its highest import."""
    level = {}

    def depth(v, trail=()):
        if v in level:
            return level[v]
        if v in trail:
            return 0
        level[v] = 1 + max((depth(w, trail + (v,)) for w in graph[v]), default=-1)
        return level[v]

    for v in graph:
        depth(v)
    return level


def name(module):
    return "::".join(module) or "(crate root)"


def check_crate(crate):
    src = os.path.join(ROOT, crate, "src")
    modules = module_files(src)
    graph = {m: set() for m in modules}
    for m in modules:  # every ancestor is a node too (a folder without mod.rs)
        for k in range(1, len(m)):
            graph.setdefault(m[:k], set())
    problems = []
    codes = {here: code_of(path) for here, path in modules.items()}
    exported = {here: reexports(code, here, modules) for here, code in codes.items()}
    for here, path in modules.items():
        code = codes[here]
        for lineno, line in enumerate(open(path, encoding="utf-8"), 1):
            if crate in NO_GLOBAL_STATE and GLOBAL_STATE.search(line):
                problems.append(
                    f"{os.path.relpath(path, ROOT)}:{lineno}: global mutable state: {line.strip()}"
                )
        for p in referenced_paths(code):
            target = resolve(p, here, modules, exported)
            # The crate root only declares modules; a path through it names no module.
            if target is None or target == here or target == ():
                continue
            common = 0
            while common < min(len(here), len(target)) and here[common] == target[common]:
                common += 1
            if common == len(here) or common == len(target):
                continue  # a module and its own submodule
            graph[here[: common + 1]].add(target[: common + 1])
    for comp in cycles(graph):
        members = set(comp)
        detail = "; ".join(
            f"{name(a)} -> {name(b)}"
            for a in comp
            for b in sorted(graph[a])
            if b in members
        )
        problems.append(f"{crate}: import cycle between {', '.join(map(name, comp))}: {detail}")
    return modules, graph, problems


def main():
    crates = sys.argv[1:] or DEFAULT_CRATES
    failed = False
    for crate in crates:
        modules, graph, problems = check_crate(crate)
        if problems:
            failed = True
            for p in problems:
                print(f"error: {p}")
            continue
        level = layers(graph)
        order = sorted((m for m in graph if m), key=lambda m: (len(m), m[:-1], level[m], m))
        print(f"{crate}: {len(modules)} modules, no import cycles; layers among siblings:")
        for m in order:
            print(f"  {'  ' * (len(m) - 1)}{level[m]}  {name(m)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
