"""A small ctypes binding to the system libbpf for what bcc 0.26 lacks.

bcc resolves `bpf_prog_test_run_opts` but does not define its options
struct in Python, and has no wrapper to open a program by id (needed for
XDP_FLAGS_REPLACE) or to read a pinned map's info.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from functools import cache
from typing import Any

BPF_OBJ_NAME_LEN = 16


class BpfTestRunOpts(ctypes.Structure):
    """libbpf's struct bpf_test_run_opts (libbpf 1.1)."""

    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    )


class BpfMapInfo(ctypes.Structure):
    """The leading fields of the kernel's struct bpf_map_info."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    )


class BpfProgInfo(ctypes.Structure):
    """The leading fields of the kernel's struct bpf_prog_info."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    )


@dataclass(frozen=True)
class MapInfo:
    map_type: int
    map_id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    duration_ns: int
    data_out: bytes


class LibbpfError(OSError):
    pass


@cache
def _lib() -> ctypes.CDLL:
    path = ctypes.util.find_library("bpf") or "libbpf.so.1"
    lib = ctypes.CDLL(path, use_errno=True)
    lib.bpf_prog_get_fd_by_id.argtypes = (ctypes.c_uint32,)
    lib.bpf_prog_get_fd_by_id.restype = ctypes.c_int
    lib.bpf_obj_get.argtypes = (ctypes.c_char_p,)
    lib.bpf_obj_get.restype = ctypes.c_int
    lib.bpf_obj_get_info_by_fd.argtypes = (
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint32),
    )
    lib.bpf_obj_get_info_by_fd.restype = ctypes.c_int
    lib.bpf_prog_test_run_opts.argtypes = (ctypes.c_int, ctypes.POINTER(BpfTestRunOpts))
    lib.bpf_prog_test_run_opts.restype = ctypes.c_int
    # opts NULL: libbpf takes that as the defaults (no element or map flags)
    lib.bpf_map_update_batch.argtypes = (
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_void_p,
    )
    lib.bpf_map_update_batch.restype = ctypes.c_int
    lib.bpf_map_delete_batch.argtypes = (
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_void_p,
    )
    lib.bpf_map_delete_batch.restype = ctypes.c_int
    lib.bpf_map_lookup_elem.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    lib.bpf_map_lookup_elem.restype = ctypes.c_int
    return lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        raise LibbpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def prog_fd_by_id(prog_id: int) -> int:
    """Open a loaded program by id; the caller closes the fd."""
    return _check(_lib().bpf_prog_get_fd_by_id(prog_id), f"open BPF program id {prog_id}")


def pinned_fd(path: str) -> int:
    """Open a pinned object; the caller closes the fd."""
    return _check(_lib().bpf_obj_get(path.encode()), f"open pinned {path}")


class BatchError(LibbpfError):
    """A batch map operation failed after `done` of its elements were applied."""

    def __init__(self, err: int, message: str, done: int) -> None:
        super().__init__(err, message)
        self.done = done


def map_update_batch(fd: int, keys: ctypes.Array[Any], values: ctypes.Array[Any]) -> None:
    """BPF_MAP_UPDATE_BATCH of len(keys) elements in one system call.

    Raises BatchError (errno EINVAL or ENOTSUPP where the kernel or the map
    type has no batch operations) with how many elements were written.
    """
    count = ctypes.c_uint32(len(keys))
    ret = _lib().bpf_map_update_batch(
        fd, ctypes.addressof(keys), ctypes.addressof(values), ctypes.byref(count), None
    )
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        raise BatchError(err, f"BPF_MAP_UPDATE_BATCH: {os.strerror(err)}", int(count.value))


def map_lookup(fd: int, key: Any, value: Any) -> bool:
    """Read the value of `key` into `value` (ctypes objects); False when there is none.

    No exception for a missing key (bcc's lookup raises one): a batch looks up
    every key it writes.
    """
    ret = _lib().bpf_map_lookup_elem(fd, ctypes.addressof(key), ctypes.addressof(value))
    if ret == 0:
        return True
    err = -ret if ret != -1 else ctypes.get_errno()
    if err == errno.ENOENT:
        return False
    raise LibbpfError(err, f"BPF map lookup: {os.strerror(err)}")


def map_delete_batch(fd: int, keys: ctypes.Array[Any]) -> None:
    """BPF_MAP_DELETE_BATCH of len(keys) elements (every key must exist: ENOENT otherwise)."""
    count = ctypes.c_uint32(len(keys))
    ret = _lib().bpf_map_delete_batch(fd, ctypes.addressof(keys), ctypes.byref(count), None)
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        raise BatchError(err, f"BPF_MAP_DELETE_BATCH: {os.strerror(err)}", int(count.value))


def map_info(fd: int) -> MapInfo:
    info = BpfMapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return MapInfo(
        map_type=info.type,
        map_id=info.id,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        map_flags=info.map_flags,
        name=info.name.decode(errors="replace"),
    )


def prog_id(fd: int) -> int:
    info = BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "prog info")
    return int(info.id)


@dataclass(frozen=True)
class ProgInfo:
    prog_id: int
    name: str  # as the loader named it, at most 15 bytes
    tag: str  # hex of the kernel's hash of the instructions (maps left out)


def prog_info(fd: int) -> ProgInfo:
    info = BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "prog info")
    return ProgInfo(int(info.id), info.name.decode(errors="replace"), bytes(info.tag).hex())


def prog_info_by_id(prog_id: int) -> ProgInfo:
    fd = prog_fd_by_id(prog_id)
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


class XdpMd(ctypes.Structure):
    """The UAPI struct xdp_md, passed as ctx_in to choose the ingress interface."""

    _fields_ = (
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    )


def prog_test_run(
    prog_fd: int, packet: bytes, repeat: int = 1, ingress_ifindex: int | None = None
) -> TestRunResult:
    """Run an XDP program on one frame with BPF_PROG_TEST_RUN.

    Without ingress_ifindex the kernel runs it as if received on loopback
    (ifindex 1); with it, as if received on that interface of the caller's
    network namespace (queue 0), which must exist.
    """
    data_in = ctypes.create_string_buffer(packet, len(packet))
    out_size = len(packet) + 256
    data_out = ctypes.create_string_buffer(out_size)
    opts = BpfTestRunOpts(
        sz=ctypes.sizeof(BpfTestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_out=ctypes.cast(data_out, ctypes.c_void_p),
        data_size_in=len(packet),
        data_size_out=out_size,
        repeat=repeat,
    )
    if ingress_ifindex is not None:
        # the kernel wants data = 0 and data_end = the frame's length (no metadata)
        ctx = XdpMd(data=0, data_end=len(packet), ingress_ifindex=ingress_ifindex)
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(XdpMd)
    _check(_lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return TestRunResult(
        retval=opts.retval,
        duration_ns=opts.duration,
        data_out=data_out.raw[: opts.data_size_out],
    )
