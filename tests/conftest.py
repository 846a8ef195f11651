import sys
from pathlib import Path

# Test helpers (fakes, fixtures builders) live beside the tests and are imported as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
