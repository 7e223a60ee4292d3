"""Load an extension into the stand-in host the way the WebUI does at start (and on "Reload UI")."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)


def script_files(extension_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(extension_dir, "scripts").glob("*.py"))


def load_scripts(extension_dir: str | os.PathLike, *, strict: bool = True) -> list[ModuleType]:
    """Import every scripts/*.py as the host does (modules.scripts.load_scripts + script_loading.load_module).

    Each file becomes a module named after the file (not put in sys.modules); the extension folder is first on
    sys.path and `scripts.basedir()` returns it only while that file is imported. The host reports an error and
    carries on; with `strict` the stand-in re-raises so a test sees it.
    """
    from modules import errors, paths, script_loading, scripts

    extension_dir = str(Path(extension_dir).resolve())
    loaded = []
    for path in script_files(extension_dir):
        syspath = sys.path
        try:
            sys.path = [extension_dir] + sys.path
            scripts.current_basedir = extension_dir
            loaded.append(script_loading.load_module(str(path)))
        except Exception:
            errors.report(f"Error loading script: {path.name}", exc_info=True)
            if strict:
                raise
        finally:
            sys.path = syspath
            scripts.current_basedir = paths.script_path
    return loaded


def build_ui() -> list:
    """What the host's create_ui does with extension callbacks: before_ui, settings, then the tabs."""
    from modules import script_callbacks

    script_callbacks.before_ui_callback()
    script_callbacks.ui_settings_callback()
    return script_callbacks.ui_tabs_callback()


def start_app(app, demo=None) -> None:
    from modules import script_callbacks

    script_callbacks.app_started_callback(demo, app)


def reload_ui() -> None:
    """The host's "Reload UI": script_unloaded callbacks run, then every callback is cleared."""
    from modules import script_callbacks

    script_callbacks.script_unloaded_callback()
    script_callbacks.clear_callbacks()
