#!/usr/bin/env python3
# Registers, spills and shared memory of every kernel of a CUDA source, as ptxas reports them,
# compiled here by NVRTC as the variant compiles it on the GPU (sm_90, --fmad=false), with no GPU
# and no CUDA toolkit: only libnvrtc, which .ci/run fetches from PyPI into the cache.
#
#   tools/kernel-registers.py [SOURCE.cu ...] [--only SUBSTRING] [-D NAME]... [--digest]
#                             [--against REV]
#     SOURCE.cu   default variants/current/src/cuda/kernels.cu; several are compiled as one
#                 source, in order (matvec_candidates.cu needs kernels.cu first)
#     --only S    only the kernels whose name contains S
#     -D NAME     a macro the source is compiled with, as the variant passes NVRTC (a source
#                 may compile some kernels only for models that use them: kernels.cu's
#                 `-D LONG_ROWS -D LONGEST_ROWS` for its long-row kernels, `-D PIPELINED`
#                 for the wide models' matmul pipeline, and with it `-D WGMMA`, its warpgroup
#                 MMAs, compiled for sm_90a as the variant does)
#     --digest    also each kernel's code digest (the first 12 hex digits of the SHA-256 of its
#                 `.text.KERNEL` section in the cubin): the same digest before and after an edit
#                 means the same machine code, so a change meant for long rows can show it left
#                 the default model's kernels as they were without a GPU (program.md)
#     --against R the same sources as git revision R has them (`HEAD`: the last commit),
#                 compiled the same way, and a column that says of each kernel whether its
#                 code, registers, spills and shared memory are the `same` as there, or it
#                 `changed`, or is `new`; implies --digest
#
# A kernel that spills, or whose registers limit it to fewer blocks an SM than its design
# wants, is slower for that alone; a GPU minute costs more than this check (program.md).
# Exit status 1 when any kernel shown spills.
# Needs: python3, libnvrtc 13.0 (AUTOINFER_NVRTC: its lib directory; default the cache's
# nvrtc-13.0.88, where `.ci/run` puts it).
import ctypes
import hashlib
import os
import re
import signal
import struct
import subprocess
import sys


def usage():
    with open(__file__) as f:
        for line in f.readlines()[1:]:
            if not line.startswith("#"):
                break
            print(line[2:].rstrip())


def text_digests(cubin):
    """Each kernel's `.text.NAME` section of an ELF64 cubin, as the first 12 hex digits of its
    SHA-256, by kernel name."""
    if cubin[:5] != b"\x7fELF\x02":
        raise ValueError("the cubin is not a 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)

    def section(i):
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    digests = {}
    for i in range(shnum):
        name_at, offset, size = section(i)
        end = cubin.index(b"\0", names_at + name_at)
        name = cubin[names_at + name_at:end].decode(errors="replace")
        if name.startswith(".text."):
            code = cubin[offset:offset + size]
            digests[name[len(".text."):]] = hashlib.sha256(code).hexdigest()[:12]
    return digests


def ptxas_rows(log):
    """Each kernel's registers, spill bytes (stores/loads) and shared memory, from ptxas -v's
    lines in NVRTC's log, by kernel name."""
    rows, kernel = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            kernel = m.group(1)
            rows[kernel] = {"regs": "?", "spill": "0/0", "smem": "0"}
            continue
        if kernel is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            rows[kernel]["spill"] = f"{m.group(1)}/{m.group(2)}"
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[kernel]["regs"] = m.group(1)
            s = re.search(r"(\d+) bytes smem", line)
            rows[kernel]["smem"] = s.group(1) if s else "0"
    return rows


class CompileError(Exception):
    """NVRTC refused the source; the message is its log."""


def load_nvrtc():
    """libnvrtc 13 from AUTOINFER_NVRTC or the cache, or None (said why on stderr)."""
    cache = os.environ.get("AUTOINFER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "autoinfer")
    libdir = os.environ.get("AUTOINFER_NVRTC") or os.path.join(
        cache, "nvrtc-13.0.88/nvidia/cu13/lib")
    try:
        # The builtins library next to it is found through the same directory.
        ctypes.CDLL(os.path.join(libdir, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
        return ctypes.CDLL(os.path.join(libdir, "libnvrtc.so.13"))
    except OSError as e:
        print(f"kernel-registers.py: no libnvrtc 13 in {libdir} ({e}); run .ci/run's fetch, "
              "or set AUTOINFER_NVRTC", file=sys.stderr)
        return None


def compile_source(lib, text, defines):
    """NVRTC's log (ptxas -v) and cubin for `text`, as the variant compiles it (sm_90,
    --fmad=false) with `defines`."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), b"kernels.cu", 0, None, None):
        raise CompileError("NVRTC could not create the program")
    # The variant passes -D WGMMA only with sm_90a, whose machine code has warpgroup MMAs.
    arch = b"sm_90a" if b"-DWGMMA" in defines else b"sm_90"
    opts = [b"--gpu-architecture=" + arch, b"--fmad=false", b"--ptxas-options=-v"] + defines
    status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    log = log.value.decode(errors="replace")
    cubin = b""
    if not status:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, buffer)
        cubin = buffer.raw
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if status:
        raise CompileError(log)
    return log, cubin


def git_show(rev, path):
    """The text of `path` at git revision `rev`, from the repository that holds it."""
    folder = os.path.dirname(os.path.abspath(path))
    top = subprocess.run(["git", "-C", folder, "rev-parse", "--show-toplevel"], check=True,
                         capture_output=True, text=True).stdout.strip()
    inside = os.path.relpath(os.path.abspath(path), top)
    return subprocess.run(["git", "-C", top, "show", f"{rev}:{inside}"], check=True,
                          capture_output=True, text=True).stdout


def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        usage()
        return 0
    only = None
    digest = False
    against = None
    sources = []
    defines = []
    args = iter(argv)
    for a in args:
        if a == "--only":
            only = next(args, None)
            if only is None:
                print("kernel-registers.py: --only needs a substring", file=sys.stderr)
                return 2
        elif a == "-D":
            name = next(args, None)
            if not name or not name.replace("_", "").isalnum():
                print(f"kernel-registers.py: -D needs a macro name, got {name!r}", file=sys.stderr)
                return 2
            defines.append(b"-D" + name.encode())
        elif a == "--digest":
            digest = True
        elif a == "--against":
            against = next(args, None)
            if not against:
                print("kernel-registers.py: --against needs a git revision", file=sys.stderr)
                return 2
            digest = True
        else:
            sources.append(a)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not sources:
        sources = [os.path.join(root, "variants/current/src/cuda/kernels.cu")]
    text = ""
    for path in sources:
        try:
            with open(path) as f:
                text += f.read() + "\n"
        except OSError as e:
            print(f"kernel-registers.py: cannot read {path}: {e.strerror}", file=sys.stderr)
            return 2
    lib = load_nvrtc()
    if lib is None:
        return 2
    try:
        log, cubin = compile_source(lib, text, defines)
    except CompileError as e:
        print(f"kernel-registers.py: NVRTC failed to compile {', '.join(sources)}:\n{e}",
              file=sys.stderr)
        return 1
    theirs, their_rows = None, {}
    if against is not None:
        try:
            their_text = "".join(git_show(against, path) + "\n" for path in sources)
            their_log, their_cubin = compile_source(lib, their_text, defines)
            their_rows = ptxas_rows(their_log)
            theirs = text_digests(their_cubin)
        except subprocess.CalledProcessError as e:
            print(f"kernel-registers.py: cannot read the sources at {against}: git says "
                  f"{e.stderr.strip()}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"kernel-registers.py: cannot read the sources at {against}: {e}",
                  file=sys.stderr)
            return 2
        except CompileError as e:
            print(f"kernel-registers.py: NVRTC failed to compile the sources at {against}:\n{e}",
                  file=sys.stderr)
            return 1
        except (ValueError, struct.error) as e:
            print(f"kernel-registers.py: cannot read the kernels' code at {against}: {e}",
                  file=sys.stderr)
            return 1
    rows = ptxas_rows(log)
    spills = False
    shown = sorted(k for k in rows if only is None or only in k)
    if not shown:
        print(f"kernel-registers.py: no kernel matches {only!r}", file=sys.stderr)
        return 2
    digests = {}
    if digest:
        try:
            digests = text_digests(cubin)
        except (ValueError, struct.error) as e:
            print(f"kernel-registers.py: cannot read the kernels' code from the cubin: {e}",
                  file=sys.stderr)
            return 1
    header = f"{'kernel':32} {'registers':>9} {'spill st/ld B':>13} {'smem B':>8}"
    header += f" {'code digest':>12}" if digest else ""
    print(header + (f" vs {against}" if theirs is not None else ""))
    for k in shown:
        r = rows[k]
        spills |= r["spill"] != "0/0"
        line = f"{k:32} {r['regs']:>9} {r['spill']:>13} {r['smem']:>8}"
        line += f" {digests.get(k, '?'):>12}" if digest else ""
        if theirs is not None:
            # The same only if the code and what ptxas gave it (registers, spills, shared
            # memory) are: the digest covers `.text` alone, since the kernel's `.nv.info`
            # also holds symbol numbers that move when another kernel comes or goes.
            same = theirs.get(k) == digests.get(k) and their_rows.get(k) == r
            line += " new" if k not in theirs else (" same" if same else " changed")
        print(line)
    return 1 if spills else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly
    sys.exit(main(sys.argv[1:]))
