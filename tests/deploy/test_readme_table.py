"""README's "What each compiler accepts" quotes every refusal the deploy tests assert."""
from pathlib import Path

from accepts import COMPILER_REFUSALS
from test_qonnx import HLS4ML_REFUSAL

README = Path(__file__).resolve().parents[2] / "README.md"


def _table() -> str:
    text = README.read_text()
    start = text.index("### What each compiler accepts")
    return text[start:text.index("\n### ", start + 1)]


def test_every_asserted_refusal_is_in_the_readme_table():
    table = _table()
    for (compiler, case), message in COMPILER_REFUSALS.items():
        row = next(line for line in table.splitlines() if message in line)
        assert "✗" in row, (compiler, case)
    assert HLS4ML_REFUSAL in table


def test_the_table_has_a_cell_per_compiler_and_no_unasserted_refusal():
    rows = [line for line in _table().splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    for name in ("OpenVINO", "TVM", "IREE", "qonnx", "hls4ml"):
        assert name in header
    refusals = sum(line.count("✗") for line in body)
    assert refusals == len(COMPILER_REFUSALS) + 1   # + hls4ml's
