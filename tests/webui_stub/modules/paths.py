"""Stand-in for modules.paths: re-exports the internal paths (copies taken at import, as in the host), and, as
the host's does, imports modules.safe, which replaces torch.load for the rest of the process."""

import modules.safe  # noqa: F401
from modules.paths_internal import (  # noqa: F401
    cwd,
    data_path,
    extensions_builtin_dir,
    extensions_dir,
    models_path,
    script_path,
)
