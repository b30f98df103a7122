"""Start a command the way systemd starts a socket-activated service (test helper).

usage: sd_launch.py NAME[:NAME...] FD[,FD...] COMMAND [ARG...]

The given fds become 3, 4, ... in this process, LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (this
process's pid, which exec keeps) are set, and COMMAND replaces this process.
"""

from __future__ import annotations

import fcntl
import os
import sys


def main() -> None:
    names, fds, cmd = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], sys.argv[3:]
    # move them out of the way first: a source fd may be one of the targets
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_FDNAMES"] = names
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
