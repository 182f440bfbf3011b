"""MkDocs hook: pages that include repository files, and links that point outside docs/.

Two things the site needs that plain MkDocs does not do, in one pass over each page's Markdown:

1. **Includes.** A line that is only a link followed by ``<!-- include -->``, e.g.

       [benchmarks/README.md](../benchmarks/README.md) <!-- include -->

   is replaced by that file's text (``<!-- include: body -->`` drops the file's first ``# title`` line). On GitHub the
   line reads as a link to the file; on the site the file's text is the page. One source for README.md (the home
   page), CHANGELOG.md, CONTRIBUTING.md and benchmarks/README.md.

2. **Links out of docs/.** A relative link is resolved against the file it is written in (the included file's folder
   for included text). A target inside docs/ is rewritten relative to the page, and MkDocs then validates it as any
   link (``--strict`` fails on a missing page or anchor). A target elsewhere in the repository (``src/...``,
   ``noxfile.py``) has no page on the site: if the file exists, the link becomes its text (with ``repo_url`` set in
   mkdocs.yml it would become a link to the file there); if it does not exist, a warning, which ``--strict`` turns
   into a failure. A link to a file that a page includes (README.md, CHANGELOG.md, ...) goes to that page. Links
   inside code (fenced blocks, inline code) are left alone.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.cfpo_docs")

INCLUDE = re.compile(r"^\[[^\]]*\]\((?P<path>[^)\s]+)\)\s*<!--\s*include(?::\s*(?P<mode>body))?\s*-->\s*$")
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>(?:[^\[\]]|\[[^\]]*\])*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"(`+).+?\1")
FENCE = re.compile(r"^\s*(```|~~~)")


#: a repository file that a page includes -> that page's source file (filled by on_files)
INCLUDED: dict[Path, Path] = {}


def on_files(files, config):
    docs_dir = Path(config["docs_dir"]).resolve()
    INCLUDED.clear()
    for file in files.documentation_pages():
        page_file = (docs_dir / file.src_path).resolve()
        for line in page_file.read_text(encoding="utf-8").splitlines():
            include = INCLUDE.match(line.strip())
            if include:
                INCLUDED[(page_file.parent / include["path"]).resolve()] = page_file
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    page_file = (docs_dir / page.file.src_path).resolve()
    return _render(markdown, page_file, page_file, docs_dir, config.get("repo_url"), page.file.src_path)


def _render(markdown: str, source: Path, page_file: Path, docs_dir: Path, repo_url, where: str, depth: int = 0) -> str:
    out, in_fence = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            in_fence = not in_fence
            out.append(line)
            continue
        if in_fence:
            out.append(line)
            continue
        include = INCLUDE.match(line.strip())
        if include:
            path = (source.parent / include["path"]).resolve()
            if not path.is_file() or depth > 3:
                log.warning("%s: cannot include %s (no such file)", where, include["path"])
                out.append(line)
                continue
            text = path.read_text(encoding="utf-8")
            if include["mode"] == "body":
                text = re.sub(r"\A#\s[^\n]*\n", "", text, count=1)
            out.append(_render(text, path, page_file, docs_dir, repo_url, where, depth + 1))
            continue
        out.append(_links(line, source, page_file, docs_dir, repo_url, where))
    return "\n".join(out)


def _links(line: str, source: Path, page_file: Path, docs_dir: Path, repo_url, where: str) -> str:
    code = [m.span() for m in CODE_SPAN.finditer(line)]

    def rewrite(m: re.Match) -> str:
        if any(a <= m.start() < b for a, b in code):
            return m[0]
        target = m["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
            return m[0]  # a URL, an anchor on this page, or an absolute path (MkDocs' validation reports those)
        path_part, _, anchor = target.partition("#")
        resolved = Path(os.path.normpath(source.parent / path_part))
        resolved = INCLUDED.get(resolved, resolved)
        if resolved.is_relative_to(docs_dir):
            new = os.path.relpath(resolved, page_file.parent).replace(os.sep, "/")
            if path_part.endswith("/"):
                new += "/"
            new += f"#{anchor}" if anchor else ""
            return f"{m['bang']}[{m['text']}]({new}{m['title'] or ''})"
        root = docs_dir.parent
        if not resolved.exists():
            log.warning("%s: link to %s, which does not exist (resolved to %s)", where, target, resolved)
            return m[0]
        if repo_url and resolved.is_relative_to(root):
            url = f"{repo_url.rstrip('/')}/blob/HEAD/{resolved.relative_to(root).as_posix()}"
            return f"{m['bang']}[{m['text']}]({url})"
        return m["text"]  # a repository file the site has no page for: keep the words, drop the link

    return LINK.sub(rewrite, line)
