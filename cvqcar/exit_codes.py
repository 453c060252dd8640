"""Exit statuses of the training commands that launchers act on."""

PREEMPTED = 75  # EX_TEMPFAIL: stopped with a checkpoint; rerun to resume
INTERRUPTED_TWICE = 130  # a second SIGINT: exited at once, no checkpoint
