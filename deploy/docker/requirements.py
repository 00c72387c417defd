"""Print the requirements of one pyproject.toml extra, with the project's own extras expanded.

The Dockerfile installs these before it copies the code, so the dependency layer (TensorFlow, ~600 MB)
is rebuilt only when pyproject.toml changes. Stdlib only: it runs on the bare base image.

    python requirements.py server > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# "tapeserve[api]" or "tapeserve[api,cli]": an extra that refers to other extras of this project.
_SELF_REFERENCE = re.compile(r"^\s*(?P<name>[A-Za-z0-9_.-]+)\s*\[(?P<extras>[^\]]+)\]\s*$")


def requirements(pyproject: dict[str, object], extra: str) -> list[str]:
    """The base dependencies plus those of ``extra``, recursively, without self-references or repeats."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    name = project["name"]
    extras: dict[str, list[str]] = project.get("optional-dependencies", {})
    if extra not in extras:
        raise SystemExit(f"no extra {extra!r} in pyproject.toml; there are: {', '.join(sorted(extras))}")
    out: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()

    def expand(current: str) -> None:
        if current in seen:
            return
        seen.add(current)
        for requirement in extras[current]:
            match = _SELF_REFERENCE.match(requirement)
            if match and match["name"] == name:
                for inner in match["extras"].split(","):
                    expand(inner.strip())
            elif requirement not in out:
                out.append(requirement)

    expand(extra)
    return out


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: requirements.py EXTRA [pyproject.toml]", file=sys.stderr)
        return 2
    path = Path(argv[2]) if len(argv) > 2 else Path("pyproject.toml")
    with path.open("rb") as file:
        print("\n".join(requirements(tomllib.load(file), argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
