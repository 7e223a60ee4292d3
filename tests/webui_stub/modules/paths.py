"""Stand-in for modules.paths: re-exports the internal paths (copies taken at import, as in the host)."""

from modules.paths_internal import (  # noqa: F401
    cwd,
    data_path,
    extensions_builtin_dir,
    extensions_dir,
    models_path,
    script_path,
)
