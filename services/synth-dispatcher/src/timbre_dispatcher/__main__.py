from timbre_common.runtime import run

from .bootstrap import build
from .settings import DispatcherSettings

if __name__ == "__main__":
    run("dispatcher", build, DispatcherSettings().log_level)
