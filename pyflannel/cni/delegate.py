"""Any delegate this plugin does not do natively: run that plugin from CNI_PATH, as flannel does.

The plugin gets our environment with its config on stdin (argv is just its path: no shell, nothing from the config
reaches the argv). Its stdout is its answer: a result, or a CNI error that is passed on unchanged.
"""
from __future__ import annotations

import json
import os
import subprocess

from .protocol import DELEGATE_FAILED, CniError

TIMEOUT = 120  # seconds; a hung delegate must not hang the runtime


def find_plugin(plugin_type: str, cni_path: list[str]) -> str:
    if "/" in plugin_type or plugin_type in (".", ".."):
        raise CniError(DELEGATE_FAILED, f"delegate type {plugin_type!r} is not a plugin name")
    for folder in cni_path:
        path = os.path.join(folder, plugin_type)
        if os.access(path, os.X_OK) and os.path.isfile(path):
            return path
    raise CniError(DELEGATE_FAILED, f"delegate plugin {plugin_type!r} not found in CNI_PATH "
                                    f"{':'.join(cni_path) or '(empty)'}")


def run(command: str, delegate: dict, environ: dict, cni_path: list[str]) -> dict | None:
    """Run the delegate for `command`; its parsed result (ADD) or None; CniError with its own error on failure."""
    path = find_plugin(delegate["type"], cni_path)
    try:
        done = subprocess.run([path], input=json.dumps(delegate).encode(), capture_output=True, timeout=TIMEOUT,
                              env={**environ, "CNI_COMMAND": command})
    except subprocess.TimeoutExpired:
        raise CniError(DELEGATE_FAILED, f"delegate {path} did not answer {command} within {TIMEOUT}s") from None
    except OSError as e:
        raise CniError(DELEGATE_FAILED, f"cannot run delegate {path}: {e.strerror}") from None
    try:
        answer = json.loads(done.stdout) if done.stdout.strip() else None
    except ValueError:
        answer = None
    if done.returncode != 0:
        if isinstance(answer, dict) and isinstance(answer.get("code"), int) and "msg" in answer:
            raise CniError(answer["code"], f"delegate {delegate['type']}: {answer['msg']}", answer.get("details", ""))
        raise CniError(DELEGATE_FAILED, f"delegate {path} failed {command} (exit {done.returncode})",
                       done.stderr.decode(errors="replace").strip()[-2000:])
    if command == "ADD" and not isinstance(answer, dict):
        raise CniError(DELEGATE_FAILED, f"delegate {path} gave no result for ADD", done.stdout.decode(
            errors="replace")[:2000])
    return answer
