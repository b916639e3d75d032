"""The README's result tables are the ones results/*.json render (benchmarks/readme_tables.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_match_results():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    assert tables.missing((ROOT / "README.md").read_text()) == [], \
        "README.md drifted from results/: paste `python benchmarks/readme_tables.py` output"
