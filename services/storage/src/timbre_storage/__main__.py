from timbre_common.runtime import run

from .bootstrap import build
from .settings import StorageSettings

if __name__ == "__main__":
    run("storage", build, StorageSettings().log_level)
