"""CI runs exactly the test command the README gives a newcomer."""
from conftest import REPO_ROOT


def readme_test_command() -> str:
    for line in (REPO_ROOT / "README.md").read_text().splitlines():
        if "pytest" in line and "pip install" in line:
            return line.strip()
    raise AssertionError("README.md gives no install-and-test command")


def test_ci_runs_the_readme_test_command():
    ci_script = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_test_command() in [line.strip() for line in ci_script]


def test_ci_fails_when_no_tests_ran():
    assert '"$status" -eq 5' in (REPO_ROOT / ".ci" / "run").read_text()
