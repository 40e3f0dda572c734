from timbre_common.runtime import run

from .bootstrap import build
from .settings import WorkerSettings

if __name__ == "__main__":
    run("gpu_worker", build, WorkerSettings().log_level)
