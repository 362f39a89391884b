"""Under ``scripts/mutate``: a test's subprocess tells mutmut which of yoink's functions it ran.

mutmut learns which tests call a function from the calls it sees in its own process, so the code
that only a kill -9 writer or a forked child runs would have no test. While mutmut collects those
calls (``MUTANT_UNDER_TEST=stats``), each subprocess writes the names of the functions it calls to
a file of its own in ``$YOINK_MUTATION_HITS``; tests/conftest.py hands them to mutmut after each
test. ``scripts/mutate`` puts this directory on ``PYTHONPATH``; it does nothing anywhere else.
"""

import os

if os.environ.get("MUTANT_UNDER_TEST") == "stats" and os.environ.get("YOINK_MUTATION_HITS"):
    import mutmut.mutation.trampoline as _trampoline

    _seen: set[str] = set()
    _hits = os.path.join(os.environ["YOINK_MUTATION_HITS"], str(os.getpid()))

    def _record(name: str, caller: str | None = None) -> None:
        if name not in _seen:  # written at once: a writer may be killed with SIGKILL at any moment
            _seen.add(name)
            with open(_hits, "a") as file:
                file.write(name + "\n")

    _trampoline.record_trampoline_hit = _record  # type: ignore[assignment]
