"""Stand-in for modules.scripts: basedir() during an extension script's import, and the Script base class."""

from modules import paths

current_basedir = paths.script_path
scripts_data = []

AlwaysVisible = object()


def basedir():
    """The directory of the extension whose script is being imported (the webui root otherwise)."""
    return current_basedir


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass
