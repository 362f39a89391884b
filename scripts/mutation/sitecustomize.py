"""Under ``scripts/mutate``: a test's subprocess tells mutmut which of yoink's functions it ran.

mutmut learns which tests call a function from the calls it sees in its own process, so the code
that only a kill -9 writer or a forked child runs would have no test. While mutmut collects those
calls (``MUTANT_UNDER_TEST=stats``), each subprocess, and each child forked from mutmut's process,
writes the names of the functions it calls to a file of its own in ``$YOINK_MUTATION_HITS``;
tests/conftest.py hands them to mutmut after each test. ``scripts/mutate`` puts this directory on
``PYTHONPATH``; it does nothing anywhere else.
"""

import os
import resource


def _record_in_a_file() -> None:
    import mutmut.mutation.trampoline as _trampoline

    seen: set[str] = set()
    hits = os.path.join(os.environ["YOINK_MUTATION_HITS"], str(os.getpid()))

    def record(name: str, caller: str | None = None) -> None:
        if name not in seen:  # written at once: a writer may be killed with SIGKILL at any moment
            seen.add(name)
            # A test may have limited the size of the files its process writes (RLIMIT_FSIZE, to
            # make a write fail part-way): the limit is the test's, not this file's.
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            if soft != hard:
                resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
            try:
                with open(hits, "a") as file:
                    file.write(name + "\n")
            finally:
                if soft != hard:
                    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    _trampoline.record_trampoline_hit = record  # type: ignore[assignment]


def _after_fork() -> None:  # mutmut's own process sets MUTANT_UNDER_TEST once it has started
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        _record_in_a_file()


if os.environ.get("YOINK_MUTATION_HITS"):
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        _record_in_a_file()
    os.register_at_fork(after_in_child=_after_fork)
