"""udedup: measure, predict and control Linux KSM (Kernel Samepage Merging)."""
from .errors import *  # noqa: F401,F403  (the exception tree is part of the public API)
from .pages import PAGE_SIZE

__version__ = "0.1.0"
__all__ = ["PAGE_SIZE", "__version__"]
from .ksm import Ksm, KsmStats  # noqa: E402
from .memory import (MergeableBuffer, disable_process_merge, enable_process_merge,  # noqa: E402
                     mergeable_array, process_merge_enabled)
__all__ += ["Ksm", "KsmStats", "MergeableBuffer", "mergeable_array", "enable_process_merge",
            "disable_process_merge", "process_merge_enabled"]
from .procksm import process_ksm, top_processes  # noqa: E402
__all__ += ["process_ksm", "top_processes"]
from .inject import disable, enable  # noqa: E402
__all__ += ["enable", "disable"]
from . import estimate  # noqa: E402  (callable: udedup.estimate(pid) runs estimate.estimate)
from .estimate import Estimate, Prediction  # noqa: E402
from .procmem import Mapping, RemoteReader, present_pages, read_mappings  # noqa: E402
__all__ += ["estimate", "Estimate", "Prediction", "Mapping", "RemoteReader", "present_pages",
            "read_mappings"]
from .config import Config, load_config  # noqa: E402  (the daemon's configuration)
from .daemon import read_daemon_state  # noqa: E402
__all__ += ["Config", "load_config", "read_daemon_state"]
from .abtest import ABInterrupted, ABResult, run_ab  # noqa: E402  (the A/B harness)
from .workloads import CommandWorkload, PidWorkload, SyntheticSpec, SyntheticWorkload  # noqa: E402
__all__ += ["run_ab", "ABResult", "ABInterrupted", "SyntheticSpec", "SyntheticWorkload",
            "CommandWorkload", "PidWorkload"]
