"""Product code never runs a shell: every subprocess call is an argv list, never shell=True, os.system or os.popen,
and none of the driver's request handlers reach a subprocess with a request string."""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
PRODUCT = list((REPO / "pyflannel").rglob("*.py"))
FORBIDDEN_CALLS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"), ("subprocess", "getoutput"),
                   ("subprocess", "getstatusoutput")}


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value,
                                                                                             ast.Name):
            yield node, (node.func.value.id, node.func.attr)


def test_no_shell_anywhere_in_product_code():
    assert len(PRODUCT) > 20
    problems = []
    for path in PRODUCT:
        tree = ast.parse(path.read_text(), str(path))
        for node, name in calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name in FORBIDDEN_CALLS:
                problems.append(f"{where}: {'.'.join(name)}")
            if name[0] == "subprocess":
                if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in node.keywords):
                    problems.append(f"{where}: shell=")
                if node.args and not isinstance(node.args[0], (ast.List, ast.Name)):
                    problems.append(f"{where}: command is not an argv list")
    assert not problems, problems


def test_no_ip_command_in_product_code():
    """netlink goes through pyroute2: no `ip`/`bridge` subprocesses."""
    for path in PRODUCT:
        for node, name in calls(ast.parse(path.read_text())):
            if name[0] == "subprocess" and node.args and isinstance(node.args[0], ast.List) and node.args[0].elts:
                first = node.args[0].elts[0]
                assert not (isinstance(first, ast.Constant) and first.value in ("ip", "bridge")), \
                    f"{path}:{node.lineno}"
