from timbre_common.runtime import run

from .bootstrap import build
from .settings import GatewaySettings

if __name__ == "__main__":
    run("gateway", build, GatewaySettings().log_level)
