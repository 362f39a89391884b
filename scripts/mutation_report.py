"""The mutation score of each module after ``scripts/mutate``, and the survivors nobody explained.

    .venv/bin/python scripts/mutation_report.py yoink/_records.py ...   # after scripts/mutate
    .venv/bin/python scripts/mutation_report.py --survivors yoink/_records.py   # those left to explain

A survivor is explained when ``scripts/mutants-equivalent.txt`` holds its function and its change,
with the reason it cannot be told apart from the original. Entries are keyed by what the mutant
changes, not by mutmut's numbering, so they survive edits elsewhere in the function::

    xǁCheckpointManagerǁ_refusal | - return StorageClosedError(...) | + ... | why it is equivalent

The score counts killed mutants (and those caught by a time-out) plus the explained survivors,
over all mutants. Exit status 1 if a survivor (or an unchecked mutant) is left unexplained.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

EQUIVALENT = Path(__file__).with_name("mutants-equivalent.txt")
CORE = [
    "yoink/_manager.py",
    "yoink/_records.py",
    "yoink/_json.py",
    "yoink/_lines.py",
    "yoink/storage/_local.py",
    "yoink/storage/_files.py",
]
CAUGHT = {"killed", "timeout", "segfault", "caught by type check"}


def change_of(name: str, path: str) -> str:
    """``function | - old | + new``: the mutant's function and the lines it changes."""
    function = name.rsplit(".", 1)[-1].rsplit("__mutmut_", 1)[0]
    diff = get_diff_for_mutant(name, path=path).splitlines()
    changed = [
        f"{line[0]} {line[1:].strip()}"
        for line in diff
        if line[:1] in "-+" and not line.startswith(("---", "+++"))
    ]
    return " | ".join([function, *changed])


def explained() -> dict[str, str]:
    """The equivalent mutants' changes, each with its reason."""
    reasons = {}
    for number, line in enumerate(EQUIVALENT.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        change, separator, reason = line.rpartition(" || ")
        if not separator or not reason.strip():
            raise SystemExit(f"{EQUIVALENT}:{number}: an entry is 'change || reason'")
        reasons[change] = reason
    return reasons


def survivors(paths: list[str]) -> list[str]:
    """The mutants that survived and are not listed as equivalent, for mutmut to run again."""
    reasons = explained()
    names = []
    for path in paths:
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            if status_by_exit_code[code] == "survived" and change_of(name, path) not in reasons:
                names.append(name)
    return sorted(names)


def main() -> int:
    paths = [arg for arg in sys.argv[1:] if arg != "--survivors"]
    if "--survivors" in sys.argv[1:]:
        print("\n".join(survivors(paths)))
        return 0
    reasons = explained()
    left = 0
    for path in paths or CORE:
        data = SourceFileMutationData(path=path)
        data.load()
        if not data.exit_code_by_key:
            print(f"{path}: no results (run scripts/mutate {path} first)")
            left += 1
            continue
        caught = equivalent = 0
        unexplained = []
        for name, code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[code]
            if status in CAUGHT:
                caught += 1
                continue
            change = change_of(name, path)
            if status == "survived" and change in reasons:
                equivalent += 1
            else:
                unexplained.append(f"  {status}: {name}\n      {change}")
        total = len(data.exit_code_by_key)
        print(
            f"{path}: {total} mutants, {caught} killed, {equivalent} equivalent (listed), "
            f"{len(unexplained)} left: score {(caught + equivalent) / total:.1%} "
            f"(killed only: {caught / total:.1%})"
        )
        print("\n".join(unexplained))
        left += len(unexplained)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
