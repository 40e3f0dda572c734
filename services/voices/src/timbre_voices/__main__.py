from timbre_common.runtime import run

from .bootstrap import build
from .settings import VoicesSettings

if __name__ == "__main__":
    run("voices", build, VoicesSettings().log_level)
