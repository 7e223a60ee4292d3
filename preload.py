"""Called by the WebUI with its argparse parser before the command line is parsed (modules/cmd_args.py style)."""


def preload(parser) -> None:
    try:
        from modules.paths_internal import normalized_filepath
    except ImportError:  # an older host without it: keep the path as given
        normalized_filepath = str
    parser.add_argument(
        "--dreambooth-dir", type=normalized_filepath, default=None,
        help="Dreambooth extension: folder for projects, generated class images, samples and training state "
             "(default: <models dir>/dreambooth, which follows --models-dir)")
