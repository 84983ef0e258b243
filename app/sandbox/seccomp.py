"""The seccomp filter of the sandbox: a classic-BPF program, assembled here in
pure Python and handed to bubblewrap (``--seccomp FD``), which installs it
right before it starts the sandbox's first process; every process in the
sandbox inherits it and none can remove it.

It is a deny-list of the system calls a Python data stack never needs but an
attacker wants: kernel attack surface that namespaces do not cover
(io_uring, bpf, perf_event_open, userfaultfd, keyrings), reaching into other
processes (ptrace, process_vm_readv/writev, pidfd_getfd, kcmp), and anything
that mounts, changes namespaces or administers the machine. Those answer
EPERM. A system call of another ABI (32-bit or x32 on x86_64) kills the
process, since its numbers would bypass the list.
"""

from __future__ import annotations

import errno
import platform
import struct
from typing import Final

# Every system call denied, by name (documented in the README's security section).
DENIED: Final = (
    # kernel attack surface
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open", "userfaultfd",
    "add_key", "request_key", "keyctl",
    # other processes' memory and file descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp", "process_madvise",
    # mounts and namespaces
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
    # administering the machine
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "swapon", "swapoff",
    "reboot", "acct", "quotactl", "syslog", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime",
    "fanotify_init", "vhangup", "lookup_dcookie", "memfd_secret", "uselib", "ioperm", "iopl",
)  # fmt: skip

# System call numbers per architecture (from the kernel's unistd headers).
_X86_64: Final = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
    "mount": 165, "umount2": 166, "pivot_root": 155, "swapon": 167, "swapoff": 168, "reboot": 169, "acct": 163,
    "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "setns": 308, "open_by_handle_at": 304,
    "name_to_handle_at": 303, "quotactl": 179, "syslog": 103, "settimeofday": 164, "clock_settime": 227,
    "adjtimex": 159, "clock_adjtime": 305, "kcmp": 312, "fanotify_init": 300, "vhangup": 153, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "pidfd_getfd": 438, "process_madvise": 440, "lookup_dcookie": 212, "uselib": 134, "ioperm": 173,
    "iopl": 172, "memfd_secret": 447, "chroot": 161,
}  # fmt: skip
_AARCH64: Final = {
    "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
    "kexec_load": 104, "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106,
    "mount": 40, "umount2": 39, "pivot_root": 41, "swapon": 224, "swapoff": 225, "reboot": 142, "acct": 89,
    "add_key": 217, "request_key": 218, "keyctl": 219, "unshare": 97, "setns": 268, "open_by_handle_at": 265,
    "name_to_handle_at": 264, "quotactl": 60, "syslog": 116, "settimeofday": 170, "clock_settime": 112,
    "adjtimex": 171, "clock_adjtime": 266, "kcmp": 272, "fanotify_init": 262, "vhangup": 58, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "pidfd_getfd": 438, "process_madvise": 440, "lookup_dcookie": 18, "memfd_secret": 447, "chroot": 51,
}  # fmt: skip
# AUDIT_ARCH_* values (the arch field of struct seccomp_data), and the syscall tables.
_ARCHES: Final = {"x86_64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _AARCH64)}
_X32_BIT: Final = 0x40000000

# Classic BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
# Offsets in struct seccomp_data: int nr; __u32 arch; ...
_NR, _ARCH = 0, 4


class UnsupportedArchitecture(Exception):
    pass


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(machine: str | None = None) -> bytes:
    """The filter for this machine's architecture, as bubblewrap reads it."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise UnsupportedArchitecture(f"no seccomp filter for the {machine} architecture (x86_64 and aarch64 only)")
    audit_arch, numbers = _ARCHES[machine]
    deny = _RET_ERRNO | errno.EPERM
    code = [
        _op(_LD_W_ABS, _ARCH),
        _op(_JEQ_K, audit_arch, jt=1),  # our ABI: skip the kill
        _op(_RET_K, _RET_KILL_PROCESS),
        _op(_LD_W_ABS, _NR),
    ]
    if machine == "x86_64":  # x32 system calls carry this bit: their own numbering, not listed here
        code += [_op(_JGE_K, _X32_BIT, jf=1), _op(_RET_K, _RET_KILL_PROCESS)]
    for name in DENIED:
        if name in numbers:  # a few (iopl, ioperm, uselib) exist on x86_64 only
            code += [_op(_JEQ_K, numbers[name], jf=1), _op(_RET_K, deny)]
    code.append(_op(_RET_K, _RET_ALLOW))
    return b"".join(code)
