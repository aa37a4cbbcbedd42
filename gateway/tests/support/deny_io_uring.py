#!/usr/bin/env python3
"""Runs a command under a seccomp filter that fails io_uring_setup with EPERM.

Docker's and containerd's default seccomp profiles (and Kubernetes' RuntimeDefault) do just
this, so the gateway's tests can see what a user in such a container sees. Usage:
    deny_io_uring.py PROGRAM [ARGS...]
"""
import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
IO_URING_SETUP = 425  # the same number on every architecture (syscalls added after 5.1 are)

# Classic BPF over struct seccomp_data: load the syscall number, deny io_uring_setup.
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06
program = [
    (BPF_LD_W_ABS, 0, 0, 0),
    (BPF_JEQ_K, 0, 1, IO_URING_SETUP),
    (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
    (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
]
filters = b"".join(struct.pack("HBBI", *insn) for insn in program)
buf = ctypes.create_string_buffer(filters, len(filters))


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


libc = ctypes.CDLL(None, use_errno=True)
prog = SockFprog(len(program), ctypes.cast(buf, ctypes.c_void_p))
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
    sys.exit(f"prctl(SECCOMP): {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[1], sys.argv[1:])
