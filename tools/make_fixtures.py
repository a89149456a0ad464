#!/usr/bin/env python3
"""Regenerates the test fixtures under tests/fixtures/.

  python3 tools/make_fixtures.py tokenizers   # tools/fixtures/tokenizers.py (tokenizers, transformers)
  python3 tools/make_fixtures.py models       # tools/fixtures/models.py (also needs torch)
  python3 tools/make_fixtures.py all          # tokenizers first: the models copy them

Extra arguments after the target go to the script (e.g. `models --only llama3`).
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {
    "tokenizers": os.path.join(HERE, "fixtures", "tokenizers.py"),
    "models": os.path.join(HERE, "fixtures", "models.py"),
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("tokenizers", "models", "all"):
        sys.exit(__doc__)
    target, extra = sys.argv[1], sys.argv[2:]
    for name in (["tokenizers", "models"] if target == "all" else [target]):
        print(f"== {name}", flush=True)
        rc = subprocess.call([sys.executable, SCRIPTS[name]] + (extra if target != "all" else []))
        if rc != 0:
            sys.exit(f"make_fixtures: {name} failed (exit {rc})")


if __name__ == "__main__":
    main()
