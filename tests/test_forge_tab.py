"""The tab on Forge's page: it follows Forge's own checkpoint dropdown (elem_classes model_selection, no elem_id)
and redraws its model box when Forge's "VAE / Text Encoder" selection changes."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ("forge_stub.fixtures",)  # the make_forge and forge fixtures

REPO = Path(__file__).resolve().parent.parent


def _wired_to(demo, source, target) -> bool:
    for dependency in demo.dependencies:
        targets = [t[0] if isinstance(t, (list, tuple)) else t for t in dependency["targets"]]
        if source._id in targets and dependency["outputs"] == [target._id]:
            return True
    return False


def test_the_tab_redraws_forges_checkpoint_dropdown_and_follows_its_module_selection(forge):
    from webui_stub import load_extension as loader

    (module,) = loader.load_scripts(REPO)
    try:
        (interface,) = loader.build_ui()
        tab = module.tabs[0]
        dropdown = forge.shared.settings_components["sd_model_checkpoint"]
        assert "model_selection" in dropdown.elem_classes and not dropdown.elem_id  # Forge's, not the WebUI's
        assert _wired_to(forge.shared.demo, tab.selection_token, dropdown)

        adapter = module._adapter()
        before = adapter.model_version()
        forge.select_modules(forge.write_vae("picked.safetensors"))
        assert adapter.model_version() != before  # the model box names the new VAE at its next poll
    finally:
        module.jobs.shutdown(10)


def test_a_dropdown_forge_redraws_after_an_update_is_not_attached_again(forge):
    """Seen in a real Forge: gradio 4 makes a new dropdown (render=False, outside the page's Blocks) each time an event
    updates it, and Forge announces it to the after-component callbacks; attaching that one logged "Cannot call change
    outside of a gradio.Blocks context" at every page load, Start, Resume and Load."""
    from modules import errors
    from webui_stub import load_extension as loader

    (module,) = loader.load_scripts(REPO)
    try:
        loader.build_ui()
        tab = module.tabs[0]
        dropdown = forge.shared.settings_components["sd_model_checkpoint"]
        reported = len(errors.reported)
        forge.main_entry.redraw_checkpoint_dropdown()
        assert errors.reported[reported:] == []
        token_events = [d for d in forge.shared.demo.dependencies
                        if tab.selection_token._id in [t[0] if isinstance(t, list | tuple) else t
                                                       for t in d["targets"]]]
        assert len(token_events) == 1 and _wired_to(forge.shared.demo, tab.selection_token, dropdown)
    finally:
        module.jobs.shutdown(10)
