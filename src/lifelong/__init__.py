"""lifelong: change pretrained models after pretraining without breaking what they know.

The public API is `lifelong.api` (see its docstring for a tour): open or create a ledger, learn, edit,
revert, resume, export, verify, run a config, generate images. Its functions are re-exported here.
"""

__version__ = "0.1.0"

from lifelong.api import (  # noqa: E402 - after __version__, which lower modules may read
    EditRequest,
    Ledger,
    Probe,
    edit,
    export,
    generate,
    init,
    learn,
    load_run_config,
    log,
    open_ledger,
    report,
    resume,
    revert,
    run,
    show,
    verify,
)

__all__ = ["EditRequest", "Ledger", "Probe", "edit", "export", "generate", "init", "learn", "load_run_config", "log",
           "open_ledger", "report", "resume", "revert", "run", "show", "verify"]
