"""docs/config.md, generated from the typed config: every key with its default, its rule and the comment beside
its field in ``multitask/config.py``, so a documented default cannot go stale (a test compares the file with
what this writes). ``make docs`` or ``python -m multitask.config_reference docs/config.md``.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import sys
import tokenize
from pathlib import Path
from typing import Dict, List

from multitask import config as config_module
from multitask.config import INF, Config, HeadConfig, StageConfig
from multitask.heads import KINDS


def field_comments() -> Dict[str, Dict[str, str]]:
    """class name -> field -> its comment: the lines of comment just above the field and the one at its end."""
    source = Path(config_module.__file__).read_text()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out: Dict[str, Dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, n = [], item.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            trailing = [comments[item.end_lineno]] if item.end_lineno in comments else []
            out.setdefault(node.name, {})[item.target.id] = " ".join(above + trailing)
    return out


def rule(key: str, metadata) -> str:
    """The rule beside a field (config.one_of, config.within), or the head kinds for heads.N.kind."""
    choices = tuple(KINDS) if key == "heads.N.kind" else metadata.get("choices")
    if choices:
        return " \\| ".join(f"`{c}`" for c in choices)
    if "range" in metadata:
        low, high, low_ok = metadata["range"]
        return f"{'≥' if low_ok else '>'} {low:n}" + (f", ≤ {high:n}" if high != INF else "")
    return ""


def value(v) -> str:
    if dataclasses.is_dataclass(v):
        return "see below"
    text = "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return f"`{text}`"


def escape(text: str) -> str:
    return text.replace("|", "\\|")


def section_rows(prefix: str, obj, comments: Dict[str, Dict[str, str]]) -> List[str]:
    """A row per setting of a section, a sub-section's settings in its place (``data.synthetic.people``)."""
    rows = []
    for f in dataclasses.fields(obj):
        sub = getattr(obj, f.name)
        if dataclasses.is_dataclass(sub):
            rows += section_rows(f"{prefix}{f.name}.", sub, comments)
        else:
            rows.append(f"| `{prefix}{f.name}` | {value(sub)} | {rule(prefix + f.name, f.metadata)} | "
                        f"{escape(comments[type(obj).__name__].get(f.name, ''))} |")
    return rows


def reference() -> str:
    cfg, comments = Config(), field_comments()
    header = ["| key | default | allowed | what it does |", "|---|---|---|---|"]
    lines = ["# Configuration reference", "",
             "Generated from `multitask/config.py` by `make docs` (`python -m multitask.config_reference "
             "docs/config.md`); a test fails when this file is stale. Set any key on the command line as "
             "`section.key=value` (`heads.2.kind=dldl` for list items), merge a preset with `data=NAME`, "
             "`model=NAME` or `experiment=NAME` (`configs/<group>/NAME.yaml`), or give a YAML file. "
             "`multitask train --show-config` prints the resolved config.", "",
             "## Run", "", *header,
             *[row for row in section_rows("", cfg, comments)
               if "." not in row.split("`")[1] and row.split("`")[1] not in ("heads", "stages")]]
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if f.name == "heads":
            lines += ["", "## heads", "", "A list, one entry per task head; the default is the face task "
                      "(the competition's 18-class code is `6 * mask + 3 * gender + age`):", ""]
            lines += [f"- `heads.{i}`: {h.name} (column `{h.column}`, classes {', '.join(h.classes)})"
                      for i, h in enumerate(sub)]
            lines += ["", *header, *section_rows("heads.N.", HeadConfig("NAME", "COLUMN"), comments)]
            lines += ["", "Head kinds (`heads.N.kind`, `multitask/heads.py`):", "", "| kind | what the head learns |",
                      "|---|---|", *[f"| `{name}` | {k.doc} |" for name, k in KINDS.items()]]
        elif f.name == "stages":
            lines += ["", "## stages", "", f"{comments['Config']['stages']}. The default:", ""]
            lines += [f"- `stage{n}`: {s.epochs} epochs, "
                      + (f"heads {', '.join(s.heads)}" if s.heads else "every head")
                      + (f", photos whose {', '.join(f'{k} is {v}' for k, v in s.only.items())}" if s.only else "")
                      for n, s in enumerate(sub, 1)]
            lines += ["", *header, *section_rows("stageN.", StageConfig(), comments)]
        elif dataclasses.is_dataclass(sub):
            lines += ["", f"## {f.name}", "", *header, *section_rows(f"{f.name}.", sub, comments)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = reference()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
