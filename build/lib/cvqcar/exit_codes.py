"""Exit statuses of `python -m cvqcar.train` that launchers act on."""

# EX_TEMPFAIL: preempted, checkpoint saved; rerun the same command to resume.
PREEMPTED = 75
# A second SIGINT: stopped at once, without a final checkpoint (128 + 2).
INTERRUPTED_TWICE = 130
