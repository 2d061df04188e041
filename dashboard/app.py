"""The Streamlit entry point: ``streamlit run dashboard/app.py`` (``finpulse dashboard`` runs exactly this).

Settings come from the usual places (``$FINPULSE_CONFIG`` or ./finpulse.toml, then ``FINPULSE_*`` variables).
"""
import sys
from pathlib import Path

# Streamlit puts this file's folder on sys.path, not the repository root the packages live in.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from dashboard.ui import run  # noqa: E402  (needs the path above)

run()
