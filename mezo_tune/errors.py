"""RunError: a run that cannot start or go on, said for people. It lives apart from run.py so that modules below
run assembly (distributed, sharded) can raise it without importing upward; run.py re-exports it."""


class RunError(Exception):
    """A run that cannot start or go on, said for people."""
