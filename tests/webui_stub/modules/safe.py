"""Stand-in for modules.safe: while the host runs, `torch.load` is replaced by a checker (unless
--disable-safe-unpickle), as in v1.10.1.

The host's rule, as read from its source: a zip file may only hold entries named `<dir>/data.pkl`,
`<dir>/data/<n>`, `<dir>/version`, `<dir>/byteorder` or `<dir>/.data/serialization_id`, and its pickle may only
name a short list of globals. Anything else (including the `.format_version` / `.storage_alignment` entries that
recent `torch.save` writes) is reported as "may be malicious" and the call RETURNS None instead of raising.
"""

import collections
import pickle
import re
import zipfile

import torch
from modules import errors

ALLOWED_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
_TORCH_GLOBALS = {"FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
                  "float32", "BFloat16Storage"}


class RestrictedUnpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter",
                                                 "_rebuild_device_tensor_from_numpy"):
            return getattr(torch._utils, name)
        if module == "torch" and name in _TORCH_GLOBALS:
            return getattr(torch, name)
        if module == "__builtin__" and name == "set":
            return set
        raise Exception(f"global '{module}/{name}' is forbidden")


def check_pt(filename):
    with zipfile.ZipFile(filename) as z:
        for name in z.namelist():
            if not ALLOWED_ZIP_NAMES.match(name):
                raise Exception(f"bad file inside {filename}: {name}")
        pickles = [f for f in z.namelist() if DATA_PKL.match(f)]
        if len(pickles) != 1:
            raise Exception(f"expected one data.pkl in {filename}, found {len(pickles)}")
        with z.open(pickles[0]) as file:
            RestrictedUnpickler(file).load()


def load(filename, *args, **kwargs):
    from modules import shared

    try:
        if not shared.cmd_opts.disable_safe_unpickle:
            check_pt(filename)
    except Exception:
        errors.report(f"Error verifying pickled file from {filename}\nThe file may be malicious, so the program is "
                      "not going to read it.\nYou can skip this check with --disable-safe-unpickle commandline "
                      "argument.\n\n", exc_info=True)
        return None
    kwargs.setdefault("weights_only", False)
    return unsafe_torch_load(filename, *args, **kwargs)


# The host replaces torch.load for the whole process when this module is imported (the stand-in's fixture
# puts the original back when the test ends).
unsafe_torch_load = torch.load
torch.load = load
