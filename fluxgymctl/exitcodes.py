"""fluxgymctl's exit codes. Scripts may rely on these numbers; they never change meaning."""
import enum


class Exit(enum.IntEnum):
    OK = 0                   # the command did what was asked (wait: the job succeeded)
    JOB_NOT_SUCCEEDED = 1    # wait / submit --wait: the job ended failed, cancelled or interrupted
    USAGE = 2                # bad command line, or a job file that cannot be read
    DAEMON_UNAVAILABLE = 3   # fluxgymd is not running, not reachable, or did not answer in time
    REJECTED = 4             # fluxgymd refused the request (invalid job file, wrong state, ...)
    NOT_FOUND = 5            # no such job
    TIMEOUT = 6              # wait --timeout ran out before the job finished
    DAEMON_ERROR = 7         # fluxgymd hit an internal error (see its log)
