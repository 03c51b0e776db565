"""The ways a run stops early on purpose. Each is printed as one line, never a traceback."""


class ConfigError(ValueError):
    """A setting or an input file is wrong. The message names the setting and says how to fix it."""


class StoppedEarly(RuntimeError):
    """Training stopped before trainer.max_steps, leaving a checkpoint to resume from (if any)."""

    status = "failed"
    exit_code = 1

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


class Interrupted(StoppedEarly):
    """Ctrl-C (SIGINT) or SIGTERM: the run stopped at the end of a step and wrote a checkpoint."""

    status = "interrupted"
    exit_code = 130  # the shell's code for a Ctrl-C


class Diverged(StoppedEarly):
    """The training loss became nan or inf; the last checkpoint holds the last good weights."""

    status = "diverged"
    exit_code = 3
