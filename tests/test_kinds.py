"""Every test is of one kind, `unit` or `lab` (pyproject's markers): `make test-unit` runs the unit tests, as any
user and in seconds; the lab tests need what a host has (root, a real etcd, the kernel's namespaces, dockerd).
A test of neither kind would run in no fast suite and surprise whoever runs it without root; one of both would
run in the fast suite and need root there. Collected by pytest itself, so a per-test mark counts as a file's."""
import re
import subprocess
import sys

import pytest

from lab import REPO

pytestmark = pytest.mark.unit


def test_every_test_is_unit_or_lab():
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "-m", "not (unit or lab) or (unit and lab)", "tests"],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    strays = [line for line in collected.stdout.splitlines() if "::" in line]
    assert not strays, f"tests that are not of exactly one kind (mark them unit or lab): {strays}"
    deselected = re.search(r"\((\d+) deselected\)", collected.stdout)
    assert collected.returncode == pytest.ExitCode.NO_TESTS_COLLECTED and deselected, collected.stdout[-3000:]
    assert int(deselected.group(1)) > 500, "the whole suite was collected"
