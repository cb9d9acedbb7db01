"""The skips a CI run may have, and a pytest plugin that fails the run on any other.

``.ci/run`` sets ``PPL_VI_STRICT_SKIPS=1``: then, at the end of the session, every skipped test
whose reason is not on ``ALLOWED`` is listed and the run's exit status is 1, so a missing optional
dependency (PyYAML, TensorBoard, Chromium) cannot silently turn a claimed test into a skip. The
allow-list is documented in docs/reliability.md ("What CI runs"): CUDA only (no GPU on CI).
"""

from __future__ import annotations

import os
import re

#: reasons a CI run may skip for, as regular expressions (matched against the skip message)
ALLOWED = (r"needs a CUDA GPU", r"CUDA-graph capture needs a CUDA GPU")


def disallowed(reasons):
    """The skip reasons not on the allow-list."""
    return [r for r in reasons if not any(re.search(p, r) for p in ALLOWED)]


class StrictSkips:
    """Collects the skips of a run; with PPL_VI_STRICT_SKIPS=1, fails the run on one not allowed."""

    def __init__(self):
        self.skips = []

    def pytest_runtest_logreport(self, report):
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skips.append((report.nodeid, reason))

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        bad = [(node, reason) for node, reason in self.skips if disallowed([reason])]
        terminalreporter.write_line(f"skips: {len(self.skips)} ({len(self.skips) - len(bad)} allowed: CUDA only)")
        for node, reason in self.skips:
            terminalreporter.write_line(f"  {'ALLOWED' if (node, reason) not in bad else 'NOT ALLOWED'} {node}: {reason}")

    def pytest_sessionfinish(self, session, exitstatus):
        if os.environ.get("PPL_VI_STRICT_SKIPS") == "1" and disallowed([r for _, r in self.skips]):
            session.exitstatus = 1
