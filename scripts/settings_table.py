"""Prints (or writes into docs/configuration.md, or checks) the settings and limits tables, from Settings.

python scripts/settings_table.py            # print
python scripts/settings_table.py --write    # replace the tables in docs/configuration.md
python scripts/settings_table.py --check    # exit 1 if docs/configuration.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.api.settings import LIMIT_FIELDS, Settings  # noqa: E402

CONFIGURATION = ROOT / "docs" / "configuration.md"
MARKERS = {
    "settings": ("<!-- settings-table:start -->", "<!-- settings-table:end -->"),
    "limits": ("<!-- limits-table:start -->", "<!-- limits-table:end -->"),
}


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        text = f"{value:_}"
        if value % (1024 * 1024) == 0:
            text += f" ({value // (1024 * 1024)} MiB)"
        return text
    return str(value)


def table(names: list[str]) -> str:
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name in names:
        field = Settings.model_fields[name]
        rows.append(
            f"| `TAPESERVE_{name.upper()}` | `{_default(field.default)}` | {field.description or ''} |"
        )
    return "\n".join(rows)


def tables() -> dict[str, str]:
    server = [name for name in Settings.model_fields if name not in LIMIT_FIELDS]
    return {"settings": table(server), "limits": table(list(LIMIT_FIELDS))}


def updated(text: str) -> str:
    for key, body in tables().items():
        start, end = MARKERS[key]
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        if not rest:
            raise SystemExit(f"docs/configuration.md has no {start} marker")
        text = f"{head}{start}\n{body}\n{end}{tail}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if not (args.write or args.check):
        for body in tables().values():
            print(body, end="\n\n")
        return 0
    current = CONFIGURATION.read_text(encoding="utf-8")
    new = updated(current)
    if args.check:
        if new != current:
            print("docs/configuration.md settings tables are stale; run `make docs`", file=sys.stderr)
            return 1
        return 0
    CONFIGURATION.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
