"""``make mutation``: mutmut on the modules in MUTATE against the process-free tests in MUTATION_TESTS.

mutmut takes its settings from pyproject.toml alone, so this copies the package, the tests and
pyproject.toml into a scratch directory, appends a ``[tool.mutmut]`` table naming the modules and
tests given on the command line, runs mutmut there and prints, per module, how many mutants the
tests killed, then the diff of every mutant that survived (to be killed by a test or explained).

    python tests/mutation.py sisy_celery/schedules.py --tests tests/test_schedules.py --jobs 2
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sisy_celery"
#: mutmut's outcomes that mean the tests noticed the mutant
DETECTED = {"killed", "timeout"}

logger = logging.getLogger("mutation")


def prepare(workdir: Path, modules: list[str], tests: list[str]) -> None:
    """A fresh copy of the package, the tests and pyproject.toml with the mutmut settings."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for tree in (PACKAGE, "tests"):
        shutil.copytree(ROOT / tree, workdir / tree, ignore=ignore)
    settings = {
        "source_paths": [PACKAGE],
        "only_mutate": modules,
        "pytest_add_cli_args_test_selection": tests,
        # no coverage plugin, no cache: the copy is thrown away
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-p", "no:cov"],
    }
    table = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    text = (ROOT / "pyproject.toml").read_text()
    (workdir / "pyproject.toml").write_text(f"{text}\n[tool.mutmut]\n{table}\n")


def mutmut(workdir: Path, *args: str, capture: bool = False) -> str:
    done = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=workdir, check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)
    return done.stdout or ""


def outcomes(workdir: Path) -> dict[str, str]:
    """Mutant name -> outcome (killed, survived, timeout, no tests, ...)."""
    found = {}
    for line in mutmut(workdir, "results", "--all", "true", capture=True).splitlines():
        name, _, outcome = line.strip().rpartition(": ")
        if name:
            found[name] = outcome
    return found


def module_of(mutant: str) -> str:
    """``sisy_celery.schedules.x_next_run__mutmut_1`` -> ``sisy_celery.schedules``."""
    return mutant.split(".x", 1)[0]


def report(workdir: Path, results: dict[str, str]) -> None:
    per_module: dict[str, Counter[str]] = defaultdict(Counter)
    for name, outcome in results.items():
        per_module[module_of(name)][outcome] += 1
    print("\nmutation score (killed or timed out / all mutants):")
    for module, counts in sorted(per_module.items()):
        total = sum(counts.values())
        detected = sum(counts[outcome] for outcome in DETECTED)
        detail = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        print(f"  {module}: {detected}/{total} = {100 * detected / total:.1f}%  ({detail})")
    survivors = sorted(name for name, outcome in results.items() if outcome not in DETECTED)
    if survivors:
        print(f"\n{len(survivors)} mutant(s) not detected:")
        for name in survivors:
            print(mutmut(workdir, "show", name, capture=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="+", help="source files to mutate, e.g. sisy_celery/schedules.py")
    parser.add_argument("--tests", nargs="+", required=True, help="the test files that must kill the mutants")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "mutation")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("mutating %s against %s in %s", " ".join(options.modules), " ".join(options.tests), options.workdir)
    prepare(options.workdir, options.modules, options.tests)
    mutmut(options.workdir, "run", "--max-children", str(options.jobs))
    report(options.workdir, outcomes(options.workdir))


if __name__ == "__main__":
    main()
