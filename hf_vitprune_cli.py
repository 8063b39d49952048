"""The ``hf-vitprune`` console script: answers ``--help`` and usage errors without importing torch.

Importing the ``hf_vitprune`` package registers the pruned architectures with transformers' Auto
classes, which imports torch and transformers (seconds). The top-level help and the parsing of
the command line need neither, so this launcher loads ``hf_vitprune/cli.py`` (standard library
only at its top level) on its own for them, and imports the package only to run a command.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

COMMANDS = ("report", "card", "export", "prune")


def _standalone_cli():
    """``hf_vitprune/cli.py`` loaded as a module of its own, without importing the package."""
    package = importlib.util.find_spec("hf_vitprune")
    path = Path(package.submodule_search_locations[0]) / "cli.py"
    spec = importlib.util.spec_from_file_location("hf_vitprune_cli_standalone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:  # help, a usage error or an unknown command: no heavy imports
        return _standalone_cli().main(argv)
    from hf_vitprune.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
