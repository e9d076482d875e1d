"""Leave root once the secrets are read: how the image runs with private secret files.

Compose bind-mounts a file secret with the host file's owner and mode, so an
operator's `chmod 600` tokens file is unreadable to the image's user. The
image therefore starts as root, reads what only root may read, and switches
to `PMQ_RUN_AS` (10001:10001 in the image) before it serves anything.
"""

import os
import pwd


class RunAsError(ValueError):
    """`PMQ_RUN_AS` is not `uid[:gid]`."""


def parse_run_as(value: str) -> tuple[int, int]:
    uid_text, _, gid_text = value.partition(":")
    try:
        uid = int(uid_text)
        gid = int(gid_text) if gid_text else uid
    except ValueError:
        raise RunAsError(f"PMQ_RUN_AS must be uid or uid:gid (numbers), not {value!r}") from None
    if uid <= 0 or gid <= 0:
        raise RunAsError("PMQ_RUN_AS must name a user other than root")
    return uid, gid


def drop_privileges(run_as: str | None) -> None:
    """Become `run_as` if this process is root; a no-op for everyone else."""
    if not run_as or os.geteuid() != 0:
        return
    uid, gid = parse_run_as(run_as)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    # Prefect keeps its settings under $HOME; root's would be unwritable now.
    try:
        os.environ["HOME"] = pwd.getpwuid(uid).pw_dir
    except KeyError:
        os.environ["HOME"] = "/tmp"
