"""Forge's `modules`: the WebUI v1.10.1 stand-in's modules, with the ones Forge changed found here first."""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent),  # noqa: F811 - Forge's own modules first
            str(Path(__file__).resolve().parents[2] / "webui_stub" / "modules")]
