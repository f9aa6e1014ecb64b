"""wrenn.code_runner against a real node: the code-runner-beta template
(Jupyter Server and the `wrenn` kernel, restored from its warm snapshot),
reached through the port proxy and its WebSocket pass-through."""

from wrenn.code_runner import Capsule


def test_run_code_keeps_state_and_reports_output_and_errors():
    with Capsule() as runner:
        first = runner.run_code("x = 21", timeout=120)
        assert first.error is None
        second = runner.run_code("x * 2", timeout=120)
        assert second.text == "42"
        assert second.error is None
        printed = runner.run_code(
            "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)", timeout=120
        )
        assert "".join(printed.logs.stdout) == "to stdout\n"
        assert "".join(printed.logs.stderr) == "to stderr\n"
        failed = runner.run_code("1 / 0", timeout=120)
        assert failed.error is not None
        assert failed.error.name == "ZeroDivisionError"
        # The kernel survives an exception.
        assert runner.run_code("x + 1", timeout=120).text == "22"
