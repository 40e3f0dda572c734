from timbre_common.runtime import run

from .bootstrap import build_service
from .settings import BillingSettings

if __name__ == "__main__":
    run("billing", build_service, BillingSettings().log_level)
