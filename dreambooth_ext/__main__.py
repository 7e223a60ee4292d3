import sys

from .cli import main
from .process import keep_freed_memory

keep_freed_memory()  # this process is the engine's own (cli.main alone, called in a host's process, makes no setting)
sys.exit(main())
