#!/usr/bin/env python3
"""Checks the nvcc output of the production kernels; run by scripts/resource-gate.sh.

Input: a TSV (no header) of `path <TAB> options <TAB> ptxas log <TAB> SASS dump`, one line per
translation unit, where the ptxas log is nvcc's stderr under `-Xptxas -v` and the SASS dump is
`cuobjdump -sass` of that unit's fatbin.

- Per function and architecture: registers, static shared memory, stack frame, spill stores/loads.
  Any spill or any stack (frame or cumulative) FAILS the gate, naming the kernel, except within
  the bytes that option `spill-allowance=REGEX:BYTES` of the manifest line grants the kernels whose
  name matches REGEX (each of spill stores, spill loads and stack at most BYTES; for kernels at the
  register cap whose few spills were read in the SASS and judged harmless: say why in the manifest).
- Per kernel and architecture: HMMA (and HGMMA), LDSM (ldmatrix) and LDS.128 counts in the SASS.
  Kernels under the tensor-core requirement (option `tensor-core=REGEX` of their manifest line,
  default: all kernels of the file) FAIL the gate without HMMA, or without any LDSM / LDS.128.
- Writes the table to the report file (kernels/RESOURCES.md); if it differs from the previous
  content, prints the diff as a warning (not a failure).

Exit status: 0 pass, 1 gate failure, 2 usage or parse error.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

RE_GMEM = re.compile(r"^ptxas info\s*:\s*\d+ bytes gmem")
RE_ENTRY = re.compile(r"^ptxas info\s*:\s*Compiling entry function '([^']+)' for '(sm_\w+)'")
RE_PROPS = re.compile(r"^ptxas info\s*:\s*Function properties for (\S+)")
RE_FRAME = re.compile(
    r"^\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
RE_USED = re.compile(r"^ptxas info\s*:\s*Used (\d+) registers")
RE_SMEM = re.compile(r"(\d+) bytes smem")
RE_CUMSTACK = re.compile(r"(\d+) bytes cumulative stack size")

RE_SASS_ARCH = re.compile(r"^\s*code for (sm_\w+)")
RE_SASS_FUNC = re.compile(r"^\s*Function : (\S+)")
RE_SASS_INSN = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


@dataclass
class Func:
    name: str  # mangled
    arch: str | None
    entry: bool
    source: str
    registers: int | None = None
    smem: int = 0
    frame: int = 0
    cum_stack: int = 0
    spill_st: int = 0
    spill_ld: int = 0
    sass: dict[str, int] = field(default_factory=dict)
    tensor_core_required: bool = False
    allowance: int = 0  # bytes of spill / stack the manifest grants (spill-allowance=)


def parse_ptxas(text: str, source: str) -> list[Func]:
    """Parses `nvcc -Xptxas -v` output: one ptxas run per architecture, each opened by
    `N bytes gmem`. Non-entry (noinline device) functions get the arch of their run."""
    funcs: list[Func] = []
    block: list[Func] = []
    block_arch: str | None = None
    current: Func | None = None

    def close_block() -> None:
        for f in block:
            if f.arch is None:
                f.arch = block_arch
        block.clear()

    for line in text.splitlines():
        if RE_GMEM.match(line):
            close_block()
            block_arch = None
            current = None
            continue
        m = RE_ENTRY.match(line)
        if m:
            block_arch = m.group(2)
            current = Func(m.group(1), m.group(2), True, source)
            funcs.append(current)
            block.append(current)
            continue
        m = RE_PROPS.match(line)
        if m:
            if current is None or current.name != m.group(1) or current.registers is not None:
                # A called (non-inlined) device function, reported on its own.
                current = Func(m.group(1), None, False, source)
                funcs.append(current)
                block.append(current)
            continue
        m = RE_FRAME.match(line)
        if m and current is not None:
            current.frame, current.spill_st, current.spill_ld = map(int, m.groups())
            continue
        m = RE_USED.match(line)
        if m and current is not None:
            current.registers = int(m.group(1))
            s = RE_SMEM.search(line)
            current.smem = int(s.group(1)) if s else 0
            c = RE_CUMSTACK.search(line)
            current.cum_stack = int(c.group(1)) if c else 0
    close_block()
    return funcs


def parse_sass(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """(arch, mangled name) -> instruction counts, from `cuobjdump -sass`."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    arch = None
    cur: dict[str, int] | None = None
    for line in text.splitlines():
        m = RE_SASS_ARCH.match(line)
        if m:
            arch, cur = m.group(1), None
            continue
        m = RE_SASS_FUNC.match(line)
        if m and arch:
            cur = counts.setdefault((arch, m.group(1)), {"HMMA": 0, "LDSM": 0, "LDS.128": 0})
            continue
        m = RE_SASS_INSN.match(line)
        if m and cur is not None:
            op = m.group(1)
            head = op.split(".")[0]
            if head in ("HMMA", "HGMMA"):
                cur["HMMA"] += 1
            elif head == "LDSM":
                cur["LDSM"] += 1
            elif head == "LDS" and ".128" in op:
                cur["LDS.128"] += 1
    return counts


def demangler() -> callable:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    cache: dict[str, str] = {}

    def demangle(names: list[str]) -> dict[str, str]:
        todo = [n for n in names if n not in cache]
        if todo and tool:
            try:
                out = subprocess.run(
                    [tool], input="\n".join(todo) + "\n", capture_output=True, text=True, check=True
                ).stdout.splitlines()
                if len(out) == len(todo):
                    cache.update(zip(todo, out))
            except (OSError, subprocess.CalledProcessError):
                pass
        return {n: cache.get(n, n) for n in names}

    return demangle


def md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def render(funcs: list[Func], names: dict[str, str], toolchain: str, manifest: str, flags: str) -> str:
    lines = [
        "# Kernel resource usage",
        "",
        f"Generated by `scripts/resource-gate.sh` from `{manifest}` and",
        f"`{flags}`: do not edit by hand; rerun the gate and commit the result.",
        f"Toolchain: {toolchain}.",
        "",
        "Registers per thread; static shared memory only (dynamic shared memory is set at launch);",
        "stack = max(stack frame, cumulative stack). The gate fails on any spill or stack, except",
        f"within a kernel's `spill-allowance` in {manifest} (the reason is given there).",
        "HMMA counts tensor-core MMA instructions (HMMA/HGMMA); LDSM is ldmatrix; LDS.128 is a",
        "128-bit shared load. `tc` marks kernels that must have HMMA and LDSM or LDS.128.",
        "",
        "| arch | kernel | file | registers | static smem (B) | stack (B) | spill stores (B) "
        "| spill loads (B) | HMMA | LDSM | LDS.128 | tc |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for f in sorted(funcs, key=lambda f: (f.arch or "", names[f.name], f.source)):
        kernel = names[f.name] if f.entry else f"{names[f.name]} (device function)"
        sass = f.sass if f.entry else {}
        row = (
            "| {} | `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                f.arch or "?",
                md_escape(kernel),
                f.source,
                "" if f.registers is None else f.registers,
                f.smem,
                max(f.frame, f.cum_stack),
                f.spill_st,
                f.spill_ld,
                sass.get("HMMA", ""),
                sass.get("LDSM", ""),
                sass.get("LDS.128", ""),
                "yes" if f.tensor_core_required else "",
            )
        )
        # ptxas reports an out-of-line device function once per kernel that calls it: one row.
        if row != lines[-1]:
            lines.append(row)
    if not funcs:
        lines.append("| | (no kernel) | | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--units", required=True, help="TSV: path, options, ptxas log, SASS dump")
    ap.add_argument("--report", required=True, help="markdown table to (re)write")
    ap.add_argument("--toolchain", default="nvcc", help="one line naming the toolchain")
    ap.add_argument("--manifest", default="kernels/production.txt", help="the kernel list, named in the report")
    ap.add_argument("--flags", default="kernels/nvcc-flags.txt", help="the nvcc flags file, named in the report")
    args = ap.parse_args()

    failures: list[str] = []
    warnings: list[str] = []
    funcs: list[Func] = []
    for row in Path(args.units).read_text().splitlines():
        if not row.strip():
            continue
        path, options, log_path, sass_path = row.split("\t")
        tc_regex: str | None = ".*"
        allowance: tuple[re.Pattern[str], int] | None = None
        for opt in options.split():
            key, _, value = opt.partition("=")
            if key == "tensor-core":
                tc_regex = None if value == "none" else value
            elif key == "spill-allowance":
                regex, _, limit = value.rpartition(":")
                try:
                    allowance = (re.compile(regex), int(limit))
                except (re.error, ValueError) as e:
                    print(f"resource-gate: bad spill-allowance '{value}' for {path}: {e}", file=sys.stderr)
                    return 2
            else:
                print(f"resource-gate: unknown option '{opt}' for {path} in the manifest", file=sys.stderr)
                return 2
        unit = parse_ptxas(Path(log_path).read_text(errors="replace"), path)
        sass = parse_sass(Path(sass_path).read_text(errors="replace"))
        kernels = [f for f in unit if f.entry]
        if not kernels:
            warnings.append(f"{path}: no kernel (no entry function) in this translation unit")
        for f in unit:
            if allowance is not None and allowance[0].search(f.name):
                f.allowance = allowance[1]
            if f.entry:
                f.sass = sass.get((f.arch, f.name), {})
                if not f.sass:
                    failures.append(f"{path}: no SASS found for kernel {f.name} ({f.arch})")
        if tc_regex is not None:
            try:
                rx = re.compile(tc_regex)
            except re.error as e:
                print(f"resource-gate: bad tensor-core regex for {path}: {e}", file=sys.stderr)
                return 2
            names = demangler()([f.name for f in kernels])
            matched = [f for f in kernels if rx.search(names[f.name]) or rx.search(f.name)]
            if kernels and not matched:
                failures.append(f"{path}: tensor-core={tc_regex} matches no kernel of the file")
            for f in matched:
                f.tensor_core_required = True
        funcs.extend(unit)

    names = demangler()([f.name for f in funcs])
    for f in funcs:
        what = f"kernel {names[f.name]}" if f.entry else f"device function {names[f.name]}"
        where = f"{f.source} [{f.arch}]"
        allowed = f.allowance
        if max(f.spill_st, f.spill_ld, f.frame, f.cum_stack) > 0 and allowed > 0:
            within = max(f.spill_st, f.spill_ld, f.frame, f.cum_stack) <= allowed
            (warnings if within else failures).append(
                f"{where}: {what}: {f.spill_st} / {f.spill_ld} bytes spill stores / loads, stack "
                f"{max(f.frame, f.cum_stack)} ({f.registers} registers); allowance {allowed} bytes"
                + ("" if within else ": EXCEEDED")
            )
            continue
        if f.spill_st or f.spill_ld:
            failures.append(
                f"{where}: {what} SPILLS: {f.spill_st} bytes spill stores, "
                f"{f.spill_ld} bytes spill loads ({f.registers} registers)"
            )
        if f.frame or f.cum_stack:
            failures.append(
                f"{where}: {what} uses the stack: {f.frame} bytes stack frame, "
                f"{f.cum_stack} bytes cumulative stack (local arrays indexed at run time, or calls)"
            )
        if f.tensor_core_required:
            s = f.sass
            if s.get("HMMA", 0) == 0:
                failures.append(f"{where}: {what} has no HMMA (tensor-core MMA) in its SASS")
            if s.get("LDSM", 0) == 0 and s.get("LDS.128", 0) == 0:
                failures.append(
                    f"{where}: {what} has neither LDSM (ldmatrix) nor LDS.128 (128-bit shared "
                    "loads) in its SASS"
                )

    for f in sorted(funcs, key=lambda f: (f.arch or "", names[f.name])):
        if f.entry:
            s = f.sass
            print(
                f"resource-gate: {f.arch} {names[f.name]}: {f.registers} regs, {f.smem} B smem, "
                f"stack {max(f.frame, f.cum_stack)}, spills {f.spill_st}/{f.spill_ld}; SASS "
                f"HMMA={s.get('HMMA', 0)} LDSM={s.get('LDSM', 0)} LDS.128={s.get('LDS.128', 0)}"
                + (" (tensor-core required)" if f.tensor_core_required else "")
            )

    report = Path(args.report)
    new = render(funcs, names, args.toolchain, args.manifest, args.flags)
    old = report.read_text() if report.exists() else ""
    if new != old:
        report.write_text(new)
        diff = difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            f"{report} (committed)",
            f"{report} (regenerated)",
        )
        sys.stdout.writelines(diff)
        warnings.append(
            f"{report} differed from the regenerated table (diff above) and has been rewritten: "
            "commit it. This is a warning, not a failure."
        )
    else:
        print(f"resource-gate: {report} is up to date")

    for w in warnings:
        print(f"resource-gate: WARNING: {w}")
    if failures:
        for msg in failures:
            print(f"resource-gate: FAIL: {msg}")
        print(f"resource-gate: FAILED ({len(failures)} problem(s))")
        return 1
    kernels = sum(1 for f in funcs if f.entry)
    allowed = sum(1 for f in funcs if f.entry and f.allowance and (f.spill_st or f.spill_ld or f.frame))
    print(
        f"resource-gate: OK ({kernels} kernel builds checked: no spill, no stack"
        + (f"; {allowed} within their manifest spill allowance)" if allowed else ")")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
