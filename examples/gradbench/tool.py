"""A GradBench tool backed by a tapeserve server: GradBench's protocol on stdin/stdout.

    gradbench run --eval "gradbench repo eval lse" \\
        --tool "$ python -m examples.gradbench.tool --url http://127.0.0.1:8000"

Each line on stdin is a message (start, define, evaluate, analysis); each answer is one line on
stdout. ``define`` succeeds for the evals written here; ``evaluate`` runs the eval's function at
least ``min_runs`` times and for at least ``min_seconds``, one "evaluate" timing per run, each a
full request round trip (encoding, HTTP, the service's work, decoding): what a user of the service
waits for.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any

from examples.gradbench import Evaluate
from service.client import Client, TapeserveError

EVALS = ("hello", "lse", "llsq", "gmm", "kmeans", "det", "ba", "ht", "ode", "lstm", "particle", "saddle")


def load(name: str) -> Mapping[str, Evaluate] | None:
    if name not in EVALS:
        return None
    functions: Mapping[str, Evaluate] = importlib.import_module(f"examples.gradbench.{name}").FUNCTIONS
    return functions


def evaluate(client: Client, functions: Mapping[str, Evaluate], message: Mapping[str, Any]) -> dict[str, Any]:
    function = functions.get(message["function"])
    if function is None:
        return {"success": False, "error": f"no function {message['function']!r} in {message['module']!r}"}
    input = message["input"]
    runs = int(input.get("min_runs", 1)) if isinstance(input, dict) else 1
    seconds = float(input.get("min_seconds", 0)) if isinstance(input, dict) else 0.0
    timings: list[dict[str, Any]] = []
    started, output = time.perf_counter(), None
    while len(timings) < max(runs, 1) or time.perf_counter() - started < seconds:
        begin = time.perf_counter_ns()
        output = function(client, input)
        timings.append({"name": "evaluate", "nanoseconds": time.perf_counter_ns() - begin})
    return {"success": True, "output": output, "timings": timings}


def serve(client: Client, lines: Any, out: Any) -> None:
    modules: dict[str, Mapping[str, Evaluate]] = {}
    for line in lines:
        if not line.strip():
            continue
        message = json.loads(line)
        answer: dict[str, Any] = {"id": message["id"]}
        kind = message.get("kind")
        try:
            if kind == "define":
                functions = load(message["module"])
                answer["success"] = functions is not None
                if functions is not None:
                    modules[message["module"]] = functions
            elif kind == "evaluate":
                answer |= evaluate(client, modules[message["module"]], message)
        except (TapeserveError, ValueError, KeyError) as error:
            answer |= {"success": False, "error": "".join(traceback.format_exception_only(error)).strip()}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="the tapeserve server (default: TAPESERVE_URL)")
    parser.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")
    args = parser.parse_args()
    # base64 both ways: GradBench's arrays are large, and a value's size (ht's residuals, 3 per
    # point) is unknown to the client's automatic choice, which looks at the inputs
    with Client(args.url, timeout=args.timeout, encoding="base64") as client:
        try:
            serve(client, sys.stdin, sys.stdout)
        except (EOFError, BrokenPipeError):
            pass


if __name__ == "__main__":
    main()
