"""
jsonl.py: read a JSON-lines file the way every file of a run may be found after a crash.

pairs.jsonl, metrics.jsonl and games/*.jsonl are appended to or written line by line, so a
process killed while writing leaves a last line cut short. Every reader in the project goes
through read_jsonl, which skips such a line (and any other that is not a JSON object) instead of
raising. No torch here: report.py and the shell scripts' table code import it cheaply.

    import jsonl
    rows = jsonl.read_jsonl("runs/demo/metrics.jsonl")
"""
import json


def read_jsonl(path, warn=None):
    """The JSON objects of a .jsonl file, in order. A line that is not a JSON object (the cut last
    line of a process killed while writing, or a damaged one) is skipped; warn(line number, why)
    is called for each such line when given. Every reader of pairs.jsonl, metrics.jsonl and
    games/*.jsonl goes through here."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row, why = json.loads(line), "not a JSON object"
            except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
                row, why = None, f"not JSON ({type(e).__name__})"
            if isinstance(row, dict):
                rows.append(row)
            elif warn:
                warn(number, why)
    return rows
