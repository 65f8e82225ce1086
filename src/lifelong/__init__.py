"""lifelong: change pretrained models after pretraining without breaking what they know.

The public API is `lifelong.api` (see its docstring for a tour): open or create a ledger, learn, edit,
adapt (and chat with the result), revert, resume, export, verify, run a config, generate images. Its
functions are re-exported here.
"""

__version__ = "0.1.0"

from lifelong.api import (  # noqa: E402 - after __version__, which lower modules may read
    EditRequest,
    Ledger,
    Probe,
    adapt,
    chat,
    edit,
    export,
    export_peft,
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

__all__ = ["EditRequest", "Ledger", "Probe", "adapt", "chat", "edit", "export", "export_peft", "generate", "init", "learn",
           "load_run_config", "log", "open_ledger", "report", "resume", "revert", "run", "show", "verify"]
