"""Stand-in for modules.shared_cmd_options: preloads run on the parser, then the command line is parsed.

WEBUI_STUB_EXTENSIONS (os.pathsep-separated extension folders) says whose preload.py runs.
"""

import os

from modules import cmd_args, script_loading
from modules.paths_internal import stub_argv

parser = cmd_args.parser

for _extension_dir in filter(None, os.environ.get("WEBUI_STUB_EXTENSIONS", "").split(os.pathsep)):
    script_loading.preload_one(_extension_dir, parser)

cmd_opts = parser.parse_args(stub_argv())
cmd_opts.webui_is_non_local = any([cmd_opts.share, cmd_opts.listen, cmd_opts.ngrok, cmd_opts.server_name])
cmd_opts.disable_extension_access = cmd_opts.webui_is_non_local and not cmd_opts.enable_insecure_extension_access
